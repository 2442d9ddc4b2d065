// The gateway's userscript. Two jobs, each with its own rules:
// 1. Legacy registration: the page's own retry request always goes ahead untouched (the
//    hooks only look, inside try/catch, and never wait); one post per (domain, session
//    id, message id) unless it failed.
// 2. Tab mode: this tab runs the LMArena calls of its session. Its channel to the
//    gateway goes only through GM_xmlhttpRequest (never the page: the page's CSP may
//    forbid it); jobs come by long poll, and what the fetch reads goes back as soon as
//    it arrives, one push in flight at a time. The answer is not parsed here.
// Nothing runs on hosts other than the configured domains (and their subdomains).
(function () {
  "use strict";
/*SETTINGS*/
  var TAG = "[lmarena-registrar]";
  var UUID = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}";
  var RETRY = new RegExp("^/(?:nextjs-api|api)/stream/retry-evaluation-session-message/(" +
                         UUID + ")/messages/(" + UUID + ")/?$");
  var page = (typeof unsafeWindow !== "undefined" && unsafeWindow) ? unsafeWindow : window;
  var domain = String(page.location.hostname || "").toLowerCase();
  var underDomain = DOMAINS.some(function (d) {
    return domain === d || domain.slice(-(d.length + 1)) === "." + d;
  });
  if (!underDomain) {
    return;
  }
  var legacy = DOMAINS.indexOf(domain) >= 0;
  var gm = typeof GM_xmlhttpRequest === "function" ? GM_xmlhttpRequest : null;
  var pageFetch = typeof page.fetch === "function" ? page.fetch : null;
  var posted = Object.create(null);
  var markTimer = null;

  function idsOf(target) {
    var raw = (target && typeof target === "object" && typeof target.url === "string")
      ? target.url : String(target);
    var match = RETRY.exec(new URL(raw, page.location.href).pathname);
    return match ? [match[1].toLowerCase(), match[2].toLowerCase()] : null;
  }

  function mark(ok, text) {
    var doc = page.document;
    var show = function () {
      var old = doc.getElementById("lmarena-registrar-mark");
      if (old) { old.remove(); }
      var el = doc.createElement("div");
      el.id = "lmarena-registrar-mark";
      el.setAttribute("data-outcome", ok ? "ok" : "error");
      el.setAttribute("role", "status");
      el.textContent = (ok ? "\u2713 " : "\u2717 ") + text;
      el.style.cssText = "position:fixed;right:12px;bottom:12px;z-index:2147483647;" +
        "max-width:420px;padding:6px 10px;border-radius:6px;pointer-events:none;" +
        "font:12px/1.4 system-ui,sans-serif;color:#fff;opacity:.92;background:" +
        (ok ? "#15803d" : "#b91c1c");
      (doc.body || doc.documentElement).appendChild(el);
      if (markTimer) { clearTimeout(markTimer); }
      markTimer = setTimeout(function () { el.remove(); }, ok ? 4000 : 10000);
    };
    if (doc.body || doc.documentElement) { show(); }
    else { doc.addEventListener("DOMContentLoaded", show); }
  }

  function finish(key, ids, status, text) {
    if (status >= 200 && status < 300) {
      console.log(TAG, "registered session \"" + SESSION_NAME + "\" for " + domain +
                  " (session " + ids[0] + ", message " + ids[1] + ")");
      mark(true, "LMArena session registered as " + SESSION_NAME);
      return;
    }
    delete posted[key];  // a failed registration may be tried again on the next retry
    var reason = status ? "HTTP " + status : "the gateway could not be reached";
    try {
      var body = JSON.parse(text);
      if (body && body.error && body.error.message) { reason = String(body.error.message); }
    } catch (e) { /* not JSON: keep the status */ }
    console.warn(TAG, "registration as \"" + SESSION_NAME + "\" failed: " + reason);
    mark(false, "LMArena registration failed: " + reason);
  }

  function register(ids) {
    var key = domain + " " + ids[0] + " " + ids[1];
    if (posted[key]) { return; }
    posted[key] = true;
    var body = {domain: domain, session_name: SESSION_NAME, session_id: ids[0],
                message_id: ids[1]};
    if (REGISTRATION_TOKEN !== null) { body.registration_token = REGISTRATION_TOKEN; }
    var url = GATEWAY_URL + "/session/register";
    var payload = JSON.stringify(body);
    var done = function (status, text) { finish(key, ids, status, text); };
    if (gm) {
      gm({method: "POST", url: url, data: payload, timeout: 20000,
          headers: {"Content-Type": "application/json"},
          onload: function (r) { done(r.status, r.responseText); },
          onerror: function () { done(0, ""); },
          ontimeout: function () { done(0, ""); }});
      return;
    }
    if (!pageFetch) {
      done(0, "");
      return;
    }
    pageFetch.call(page, url, {method: "POST", mode: "cors", credentials: "omit",
                               headers: {"Content-Type": "application/json"}, body: payload})
      .then(function (r) { return r.text().then(function (t) { done(r.status, t); }); })
      .catch(function () { done(0, ""); });
  }

  function look(target) {
    if (!legacy) { return; }
    try {
      var ids = idsOf(target);
      if (ids) { register(ids); }
    } catch (e) {
      console.warn(TAG, "could not read a request:", e);
    }
  }

  function install(owner, name, fn) {
    if (typeof exportFunction === "function" && page !== window) {
      exportFunction(fn, owner, {defineAs: name});  // Firefox sandboxes
    } else {
      owner[name] = fn;
    }
  }

  if (pageFetch) {
    install(page, "fetch", function fetch(input, init) {
      look(input);
      return pageFetch.apply(this, arguments);
    });
  }
  var xhr = page.XMLHttpRequest && page.XMLHttpRequest.prototype;
  if (xhr && typeof xhr.open === "function") {
    var pageOpen = xhr.open;
    install(xhr, "open", function open(method, url) {
      look(url);
      return pageOpen.apply(this, arguments);
    });
  }
  // ---------------------------------------------------------------- tab mode
  var pageAbort = page.AbortController;
  // The tab's id lives in sessionStorage: a reload keeps it, so the gateway knows the
  // tab came back (and drops what the old page left open) instead of seeing a new one.
  var TAB_ID = (function () {
    var key = "lmarena-gateway-tab:" + SESSION_NAME, store = null, known = null;
    try { store = page.sessionStorage; known = store.getItem(key); } catch (e) { store = null; }
    if (known && /^t[a-z0-9]{20}$/.test(known)) { return known; }
    var chars = "abcdefghijklmnopqrstuvwxyz0123456789", out = "t";
    var bytes = new Uint8Array(20);
    (page.crypto || window.crypto).getRandomValues(bytes);
    for (var i = 0; i < bytes.length; i++) { out += chars[bytes[i] % chars.length]; }
    try { if (store) { store.setItem(key, out); } } catch (e) { /* private mode */ }
    return out;
  })();
  var KEPT_HEADERS = ["retry-after", "ratelimit", "content-type"];
  var tab = {connected: false, busy: false, error: null, pollTimeout: 25};

  function badge() {
    var doc = page.document;
    if (!doc.body) { return; }
    var el = doc.getElementById("lmarena-gateway-badge");
    if (!el) {
      el = doc.createElement("div");
      el.id = "lmarena-gateway-badge";
      el.setAttribute("role", "status");
      el.style.cssText = "position:fixed;left:12px;bottom:12px;z-index:2147483647;" +
        "max-width:460px;padding:4px 8px;border-radius:6px;pointer-events:none;" +
        "font:12px/1.4 system-ui,sans-serif;color:#fff;opacity:.9;";
      doc.body.appendChild(el);
    }
    var state = tab.error ? "error" : tab.busy ? "busy" : tab.connected ? "connected" : "connecting";
    var text = {
      connecting: "Gateway: connecting as " + SESSION_NAME + "\u2026",
      connected: "Gateway: connected as " + SESSION_NAME,
      busy: "Gateway: answering for " + SESSION_NAME,
      error: "Gateway (" + SESSION_NAME + "): " + tab.error
    }[state];
    el.setAttribute("data-state", state);
    el.textContent = text;
    el.style.background = {connecting: "#52525b", connected: "#15803d", busy: "#1d4ed8",
                           error: "#b91c1c"}[state];
  }

  function problem(text) {
    tab.error = text;
    badge();
  }

  function sleep(ms) { return new Promise(function (r) { setTimeout(r, ms); }); }

  // One call to the gateway; resolves {status, data} (data: parsed JSON or null).
  function call(path, fields, timeoutMs) {
    var body = {session_name: SESSION_NAME, domain: domain, registration_token: REGISTRATION_TOKEN,
                tab_id: TAB_ID};
    for (var k in fields) { body[k] = fields[k]; }
    return new Promise(function (resolve, reject) {
      gm({method: "POST", url: GATEWAY_URL + path, data: JSON.stringify(body), timeout: timeoutMs,
          headers: {"Content-Type": "application/json"},
          onload: function (r) {
            var data = null;
            try { data = r.responseText ? JSON.parse(r.responseText) : null; } catch (e) { data = null; }
            resolve({status: r.status, data: data});
          },
          onerror: function () { reject(new Error("the gateway could not be reached")); },
          ontimeout: function () { reject(new Error("the gateway did not answer in time")); }});
    });
  }

  function refusal(r) {
    var message = r.data && r.data.error && r.data.error.message;
    return new Error(message ? String(message) : "the gateway answered HTTP " + r.status);
  }

  // The page's own model list, as text: the gateway finds initialModels in it.
  function modelsSource() {
    var parts = [], size = 0, scripts = page.document.scripts;
    for (var i = 0; i < scripts.length && size < 6e6; i++) {
      var text = scripts[i].textContent || "";
      if (text.indexOf("initialModels") >= 0) { parts.push(text); size += text.length; }
    }
    return parts.join("\n");
  }

  function connect() {
    return call("/tab/connect", {models_source: modelsSource(), url: page.location.href}, 30000)
      .then(function (r) {
        if (r.status !== 200) { throw refusal(r); }
        tab.connected = true;
        tab.error = null;
        tab.pollTimeout = (r.data && r.data.poll_timeout) || 25;
        console.log(TAG, "tab connected to the gateway as \"" + SESSION_NAME + "\" on " + domain +
                    " with " + ((r.data && r.data.models) || []).length + " models");
        badge();
      });
  }

  function siteKey() {
    var scripts = page.document.querySelectorAll("script[src*='recaptcha']");
    for (var i = 0; i < scripts.length; i++) {
      var match = /[?&]render=([^&#]+)/.exec(scripts[i].src);
      if (match && match[1] !== "explicit") { return decodeURIComponent(match[1]); }
    }
    return null;
  }

  // A fresh reCAPTCHA token minted in the page, or null after 5 s (ready() can hang).
  function mint(action) {
    return new Promise(function (resolve) {
      var timer = setTimeout(function () { resolve(null); }, 5000);
      var done = function (token) { clearTimeout(timer); resolve(token || null); };
      try {
        var g = page.grecaptcha && page.grecaptcha.enterprise;
        var key = siteKey();
        if (!g || !key) { done(null); return; }
        g.ready(function () {
          g.execute(key, {action: action}).then(done, function () { done(null); });
        });
      } catch (e) { done(null); }
    });
  }

  // Runs one job: resolves once the gateway has the end of it (or told us to stop).
  function run(job) {
    return new Promise(function (resolve) {
      var payload = job.payload, controller = pageAbort ? new pageAbort() : null;
      var pending = "", head = null, headSent = false, ended = false, error = null;
      var inFlight = false, finished = false, stopped = false, lastPush = 0;
      var ticker = setInterval(function () {
        if (!inFlight && Date.now() - lastPush >= 200) { push(); }
      }, 250);

      function close() {
        if (finished) { return; }
        finished = true;
        clearInterval(ticker);
        resolve();
      }
      function stop() {
        stopped = true;
        if (controller) { try { controller.abort(); } catch (e) { /* already over */ } }
        close();
      }
      function push() {
        if (inFlight || finished) { return; }
        var fields = {job_id: job.job_id};
        if (head && !headSent) { fields.status = head.status; fields.headers = head.headers; headSent = true; }
        if (pending) { fields.text = pending; pending = ""; }
        var last = ended || error !== null;
        if (ended) { fields.done = true; }
        if (error !== null) { fields.error = error; }
        inFlight = true;
        lastPush = Date.now();
        call("/tab/push", fields, 20000).then(function (r) {
          inFlight = false;
          // The gateway read a refusal a person fixes here (a check, a sign-in): say it.
          if (r.data && typeof r.data.problem === "string") { problem(r.data.problem); }
          if (r.status !== 200 || (r.data && r.data.cancel)) { stop(); return; }
          if (last) { close(); return; }
          if (pending || (head && !headSent) || ended || error !== null) { push(); }
        }, function (e) {
          inFlight = false;
          problem(e.message);
          stop();
        });
      }

      mint((payload.recaptcha && payload.recaptcha.action) || "chat_submit").then(function (token) {
        if (stopped) { return null; }
        var body = payload.body;
        if (payload.recaptcha && payload.recaptcha.field) {
          var parsed = JSON.parse(body);
          parsed[payload.recaptcha.field] = token;
          body = JSON.stringify(parsed);
        }
        var init = {method: payload.method || "POST", headers: payload.headers || {}, body: body,
                    credentials: "include"};
        if (controller) { init.signal = controller.signal; }
        return pageFetch.call(page, new URL(payload.url, page.location.href).href, init);
      }).then(function (response) {
        if (!response || stopped) { return null; }
        var headers = {};
        KEPT_HEADERS.forEach(function (name) {
          var value = response.headers.get(name);
          if (value !== null) { headers[name] = value; }
        });
        head = {status: response.status, headers: headers};
        if (response.status < 300 && tab.error) {
          tab.error = null;  // LMArena answers again: what the badge said is over
          badge();
        }
        push();
        var reader = response.body.getReader(), decoder = new TextDecoder();
        var read = function () {
          return reader.read().then(function (part) {
            if (part.done) {
              pending += decoder.decode();
              ended = true;
              push();
              return null;
            }
            pending += decoder.decode(part.value, {stream: true});
            push();
            return read();
          });
        };
        return read();
      }).catch(function (e) {
        if (stopped) { return; }
        error = String((e && e.message) || e);
        push();
      });
    });
  }

  function work() {
    var backoff = 1000;
    var loop = function () {
      var step = tab.connected ? Promise.resolve() : connect();
      step.then(function () {
        return call("/tab/poll", {timeout_seconds: tab.pollTimeout},
                    (tab.pollTimeout + 15) * 1000);
      }).then(function (r) {
        if (r.status === 204) { return null; }
        if (r.status === 409) { tab.connected = false; return null; }
        if (r.status !== 200) { throw refusal(r); }
        backoff = 1000;
        tab.busy = true;
        badge();
        return run(r.data).then(function () {
          tab.busy = false;
          badge();
        });
      }).then(function () {
        loop();
      }, function (e) {
        tab.connected = false;
        tab.busy = false;
        problem(e.message);
        console.warn(TAG, "tab mode: " + e.message + "; trying again in " + backoff / 1000 + " s");
        setTimeout(loop, backoff);
        backoff = Math.min(backoff * 2, 60000);
      });
    };
    loop();
  }

  function startTab() {
    if (!gm || REGISTRATION_TOKEN === null || !pageFetch) {
      problem(gm ? "this script has no registration token: install it from the gateway"
                 : "tab mode needs a userscript manager with GM_xmlhttpRequest");
      return;
    }
    badge();
    work();
  }

  if (page.document.readyState === "loading") {
    page.document.addEventListener("DOMContentLoaded", startTab);
  } else {
    startTab();
  }
})();
