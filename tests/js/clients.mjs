// Node clients as their users set them up, against the gateway at argv[3].
// Prints one JSON object: what the client saw. Run by tests/test_js_clients.py.
import OpenAI from "openai";
import { createOpenAI } from "@ai-sdk/openai";
import { generateText, jsonSchema, streamText, tool } from "ai";

const [scenario, baseURL] = process.argv.slice(2);
const headers = { "X-Session-Name": "team-alpha", "X-Target-Domain": "lmarena.ai" };
const messages = [{ role: "user", content: "Hello!" }];

function sdk(options = {}) {
  return new OpenAI({ baseURL, apiKey: "sk-node", maxRetries: 0, defaultHeaders: headers, ...options });
}

async function errorOf(promise) {
  try {
    await promise;
    return null;
  } catch (error) {
    return { status: error.status ?? error.statusCode ?? null, code: error.code ?? null,
             message: error.message, body: error.responseBody ?? null };
  }
}

const scenarios = {
  async "openai-node"() {
    const client = sdk();
    const chat = await client.chat.completions.create({ model: "gpt-4", messages });
    let streamed = "";
    let usage = null;
    const stream = await client.chat.completions.create({
      model: "gpt-4", messages, stream: true, stream_options: { include_usage: true } });
    for await (const chunk of stream) {
      streamed += chunk.choices[0]?.delta?.content ?? "";
      if (chunk.usage) usage = chunk.usage;
    }
    const model = await client.models.retrieve("gpt-4");
    const response = await client.responses.create({ model: "gpt-4", input: "Hello!" });
    const events = [];
    let deltas = "";
    for await (const event of await client.responses.create({ model: "gpt-4", input: "Hello!", stream: true })) {
      events.push(event.type);
      if (event.type === "response.output_text.delta") deltas += event.delta;
    }
    const missing = await errorOf(client.models.retrieve("no-such-model"));
    const retried = await errorOf(sdk({ maxRetries: 3 }).chat.completions.create({
      model: "fake-error-503", messages }));
    return { chat: chat.choices[0].message.content, streamed, usage, model: model.id,
             responses: response.output_text, responsesUsage: response.usage, events, deltas,
             missing, retried };
  },

  async "ai-sdk"() {
    const openai = createOpenAI({ baseURL, apiKey: "sk-node", headers });
    const generated = await generateText({ model: openai("gpt-4"), prompt: "Hello!", maxRetries: 0 });
    const streamed = streamText({ model: openai("gpt-4"), prompt: "Hello!", maxRetries: 0 });
    const parts = [];
    for await (const part of streamed.textStream) parts.push(part);
    const chat = await generateText({ model: openai.chat("gpt-4"), prompt: "Hello!", maxRetries: 0 });
    const refused = await errorOf(generateText({
      model: openai("gpt-4"), prompt: "Hello!", maxRetries: 0,
      tools: { weather: tool({ description: "weather",
                               inputSchema: jsonSchema({ type: "object", properties: {} }),
                               execute: async () => "sunny" }) } }));
    return { text: generated.text, usage: generated.usage, finishReason: generated.finishReason,
             parts, streamedText: await streamed.text, chat: chat.text, refused };
  },
};

const result = await scenarios[scenario]();
console.log(JSON.stringify(result));
