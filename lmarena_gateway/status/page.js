// The status page's refresh: every few seconds read status.json and rewrite each value
// in place, formatted as page.py formats it. When rows come or go, reload the page.
(function () {
  "use strict";
  var INTERVAL = 5000;
  var main = document.querySelector("main[data-shape]");
  var updated = document.getElementById("updated");
  var note = document.getElementById("refresh-note");

  function seconds(iso) { return Date.parse(iso) / 1000; }
  function span(s) {
    s = Math.max(0, Math.floor(s));
    if (s < 60) { return s + " s"; }
    if (s < 3600) { return Math.floor(s / 60) + " min"; }
    if (s < 86400) { return Math.floor(s / 3600) + " h " + Math.floor(s % 3600 / 60) + " min"; }
    return Math.floor(s / 86400) + " d " + Math.floor(s % 86400 / 3600) + " h";
  }
  function ago(s) { return Math.floor(s) < 1 ? "just now" : span(s) + " ago"; }
  function pad(n) { return (n < 10 ? "0" : "") + n; }

  // [text, state] for one value, as page.fmt.
  function fmt(kind, v, now) {
    var none = v === null || v === undefined;
    switch (kind) {
      case "int": return [none ? "\u2014" : String(v), null];
      case "count": return [String(v), v ? "bad" : "ok"];
      case "text": return [none ? "\u2014" : String(v), null];
      case "error": return none ? ["none", null] : [String(v), "bad"];
      case "ago": return [none ? "never" : ago(now - seconds(v)), null];
      case "since": return [none ? "" : "for " + span(now - seconds(v)), null];
      case "clock":
        var d = new Date(seconds(v) * 1000);
        return [pad(d.getUTCHours()) + ":" + pad(d.getUTCMinutes()) + ":" +
                pad(d.getUTCSeconds()) + " UTC", null];
      case "duration": return [span(v), null];
      case "bytes": return [none ? "\u2014" : (v / 1048576).toFixed(1) + " MiB", null];
      case "ms": return [none ? "\u2014" : v.toFixed(1) + " ms", null];
      case "probe":
        if (none) { return ["not probed yet", "unknown"]; }
        if (v.ok) { return ["yes", "ok"]; }
        return ["no: " + v.code + (v.detail ? " (" + v.detail + ")" : ""), "bad"];
      case "connected":
        if (none) { return ["not probed yet", "unknown"]; }
        return v ? ["yes", "ok"] : ["no", "bad"];
      case "busy": return v ? ["busy", "warn"] : ["idle", null];
      case "queue": return [none ? "" : "queue " + v, null];
      case "status": return [String(v), v === "ok" ? "ok" : "bad"];
    }
    return [String(v), null];
  }

  function get(object, path) {
    return path.split(".").reduce(function (at, key) {
      return at === null || at === undefined ? at : at[key];
    }, object);
  }

  // Must equal gather.shape().
  function shape(report) {
    var sessions = report.sessions.map(function (s) {
      return s.domain + "/" + s.session_name + ":" +
        s.tabs.map(function (t) { return t.tab_id; }).join(",");
    }).join("|");
    var bridges = report.bridges.map(function (b) {
      return b.url + ":" + (b.has_api_key ? 1 : 0);
    }).join("|");
    return sessions + "#" + bridges;
  }

  function apply(report) {
    var now = seconds(report.generated_at);
    document.querySelectorAll("[data-f]").forEach(function (el) {
      var row = el.closest("[data-row]");
      var base = row ? get(report, row.getAttribute("data-row")) : report;
      var shown = fmt(el.getAttribute("data-fmt") || "text", get(base, el.getAttribute("data-f")), now);
      if (el.textContent !== shown[0]) { el.textContent = shown[0]; }
      if (shown[1]) { el.setAttribute("data-state", shown[1]); } else { el.removeAttribute("data-state"); }
    });
  }

  function refresh() {
    fetch("status.json", {cache: "no-store", credentials: "same-origin"})
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.json();
      })
      .then(function (report) {
        if (shape(report) !== main.getAttribute("data-shape")) {
          location.reload();
          return;
        }
        apply(report);
        updated.setAttribute("data-state", "ok");
        note.textContent = "";
      })
      .catch(function (error) {
        updated.setAttribute("data-state", "bad");
        note.textContent = " (refresh failed: " + error.message + ")";
      });
  }

  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      if (!window.confirm(form.getAttribute("data-confirm"))) {
        event.preventDefault();
        return;
      }
      form.elements.confirm.value = "yes";
    });
  });
  if (main) { setInterval(refresh, INTERVAL); }
})();
