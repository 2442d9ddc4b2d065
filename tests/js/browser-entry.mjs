// The openai Node SDK as a browser app bundles it (esbuild, in the test's setup).
import OpenAI from "openai";

window.runClient = async (baseURL) => {
  const client = new OpenAI({
    baseURL, apiKey: "sk-browser", dangerouslyAllowBrowser: true, maxRetries: 0,
    defaultHeaders: { "X-Session-Name": "team-alpha", "X-Target-Domain": "lmarena.ai" },
  });
  const messages = [{ role: "user", content: "Hello!" }];
  const chat = await client.chat.completions.create({ model: "gpt-4", messages });
  let streamed = "";
  for await (const chunk of await client.chat.completions.create({ model: "gpt-4", messages, stream: true })) {
    streamed += chunk.choices[0]?.delta?.content ?? "";
  }
  const response = await client.responses.create({ model: "gpt-4", input: "Hello!" });
  const model = await client.models.retrieve("gpt-4");
  return { chat: chat.choices[0].message.content, streamed, responses: response.output_text,
           model: model.id };
};
