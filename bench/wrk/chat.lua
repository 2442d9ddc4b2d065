-- A non-streaming chat completion, as an OpenAI client sends it.
wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.body = '{"model":"fake-model","messages":[{"role":"user","content":"benchmark"}],"stream":false}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Session-Name"] = "bench"
wrk.headers["X-Target-Domain"] = "lmarena.ai"
