-- GET /v1/models as a client with a named session would send it.
wrk.method = "GET"
wrk.path = "/v1/models"
wrk.headers["X-Session-Name"] = "bench"
wrk.headers["X-Target-Domain"] = "lmarena.ai"
