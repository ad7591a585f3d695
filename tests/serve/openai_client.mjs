// The official OpenAI client library against a running `subllm serve`:
//   node openai_client.mjs BASE_URL MODEL PROMPT EXPECTED_GREEDY_TEXT
// Completions and chat, plain and streamed, the error cases, and a client that leaves
// mid-stream. Prints {"ok": true, "chat": <greedy chat reply>} and exits 0 when all hold.
import assert from "node:assert/strict";
import OpenAI from "openai";

const [base, model, prompt, expected] = process.argv.slice(2);
const client = new OpenAI({ baseURL: base + "/v1", apiKey: "unused", maxRetries: 0, timeout: 60000 });

const models = await client.models.list();
assert.equal(models.data.length, 1);
assert.equal(models.data[0].id, model);

// Completions: greedy text equals `subllm generate`; streamed chunks concatenate to it.
const c = await client.completions.create({ model, prompt, max_tokens: 12, temperature: 0 });
assert.equal(c.object, "text_completion");
assert.equal(c.choices[0].text, expected);
assert.equal(c.usage.total_tokens, c.usage.prompt_tokens + c.usage.completion_tokens);
assert.ok(c.usage.completion_tokens >= 1);
let streamed = "";
let finish = null;
for await (const chunk of await client.completions.create({ model, prompt, max_tokens: 12, temperature: 0, stream: true })) {
  streamed += chunk.choices[0]?.text ?? "";
  finish = chunk.choices[0]?.finish_reason ?? finish;
}
assert.equal(streamed, expected);
assert.ok(finish === "stop" || finish === "length");

// logprobs and echo.
const lp = await client.completions.create({ model, prompt, max_tokens: 4, temperature: 0, logprobs: 2, echo: true });
assert.ok(lp.choices[0].text.startsWith(prompt));
assert.equal(lp.choices[0].logprobs.tokens.join(""), lp.choices[0].text);
// Every echoed prompt token is scored too (the first one after the document-start token).
for (const l of lp.choices[0].logprobs.token_logprobs) assert.ok(typeof l === "number" && l <= 0);
for (const t of lp.choices[0].logprobs.top_logprobs) assert.equal(Object.keys(t).length <= 2, true);

// Chat: the plain-text template; streamed deltas concatenate to the reply.
const messages = [
  { role: "system", content: "Be brief." },
  { role: "user", content: "Tell me about the old sailor." },
];
const chat = await client.chat.completions.create({ model, messages, max_tokens: 12, temperature: 0 });
assert.equal(chat.object, "chat.completion");
assert.equal(chat.choices[0].message.role, "assistant");
const reply = chat.choices[0].message.content;
let deltas = "";
let role = null;
for await (const chunk of await client.chat.completions.create({ model, messages, max_tokens: 12, temperature: 0, stream: true })) {
  role = chunk.choices[0]?.delta?.role ?? role;
  deltas += chunk.choices[0]?.delta?.content ?? "";
}
assert.equal(role, "assistant");
assert.equal(deltas, reply);

// Errors: 400 with the OpenAI error body, which the library turns into BadRequestError.
async function bad(params, pattern) {
  try {
    await client.completions.create(params);
  } catch (e) {
    assert.ok(e instanceof OpenAI.BadRequestError, `expected 400, got ${e}`);
    assert.match(e.message, pattern);
    return;
  }
  assert.fail("no error for " + JSON.stringify(params));
}
await bad({ model: "no-such-model", prompt, max_tokens: 4 }, /unknown model/);
await bad({ model, prompt, max_tokens: 1000000 }, /context/);
await bad({ model, prompt, max_tokens: 4, temperature: "hot" }, /temperature/);
await bad({ model, prompt: [1, 2, 3], max_tokens: 4 }, /prompt/);
try {
  await client.chat.completions.create({ model, messages: [{ role: "wizard", content: "hi" }] });
  assert.fail("no error for an unknown role");
} catch (e) {
  assert.ok(e instanceof OpenAI.BadRequestError);
}

// A client that leaves after the first chunk: the server carries on serving others.
const leaving = await client.completions.create({ model, prompt, max_tokens: 60, stream: true, ignore_eos: true });
for await (const chunk of leaving) {
  assert.ok(chunk.choices.length === 1);
  break;  // ends the stream and closes the connection
}
const after = await client.completions.create({ model, prompt, max_tokens: 12, temperature: 0 });
assert.equal(after.choices[0].text, expected);

console.log(JSON.stringify({ ok: true, chat: reply }));
