// nanoseek web chat: streams /v1/chat/completions (fetch + ReadableStream, SSE parsed by hand: EventSource
// cannot POST or send an Authorization header). Text is inserted with textContent only, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  model: $("model"), newChat: $("new-chat"), toggleSettings: $("toggle-settings"), settings: $("settings"),
  apiKey: $("api-key"), system: $("system"), temperature: $("temperature"), temperatureValue: $("temperature-value"),
  topP: $("top-p"), topPValue: $("top-p-value"), maxTokens: $("max-tokens"), showThinking: $("show-thinking"),
  messages: $("messages"), empty: $("empty"), error: $("error"), composer: $("composer"), prompt: $("prompt"),
  send: $("send"), stop: $("stop"),
};
const history = []; // {role, content}: the answers only; R1 is not shown its past reasoning
let controller = null;

// ---- settings, kept in localStorage (the API key too: it never leaves this browser except to this server) ----
const SETTINGS = ["apiKey", "system", "temperature", "topP", "maxTokens", "showThinking"];

function loadSettings() {
  const saved = JSON.parse(localStorage.getItem("nanoseek-settings") || "{}");
  for (const k of SETTINGS) {
    if (saved[k] === undefined) continue;
    if (els[k].type === "checkbox") els[k].checked = saved[k];
    else els[k].value = saved[k];
  }
  showValues();
}

function saveSettings() {
  const s = {};
  for (const k of SETTINGS) s[k] = els[k].type === "checkbox" ? els[k].checked : els[k].value;
  localStorage.setItem("nanoseek-settings", JSON.stringify(s));
  showValues();
}

function showValues() {
  els.temperatureValue.textContent = Number(els.temperature.value).toFixed(2);
  els.topPValue.textContent = Number(els.topP.value).toFixed(2);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (els.apiKey.value) h.Authorization = `Bearer ${els.apiKey.value}`;
  return h;
}

function showError(message) {
  els.error.textContent = message;
  els.error.hidden = !message;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.error ? body.error.message : JSON.stringify(body)}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModels() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (!r.ok) {
      showError(r.status === 401 ? "This server needs an API key: enter it under Settings." : await errorMessage(r));
      return;
    }
    const { data } = await r.json();
    els.model.replaceChildren(...data.map((m) => new Option(m.id, m.id)));
    showError("");
  } catch (e) {
    showError(`cannot reach the server: ${e.message}`);
  }
}

// ---- messages ----
function addMessage(role, text) {
  els.empty.hidden = true;
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  if (role === "assistant") {
    const thinking = document.createElement("details");
    thinking.className = "thinking";
    thinking.hidden = true;
    const summary = document.createElement("summary");
    summary.textContent = "Thinking…";
    const body = document.createElement("div");
    body.className = "thinking-body";
    thinking.append(summary, body);
    const content = document.createElement("div");
    content.className = "content";
    const meta = document.createElement("div");
    meta.className = "meta";
    div.append(thinking, content, meta);
  } else {
    const content = document.createElement("div");
    content.className = "content";
    content.textContent = text;
    div.append(content);
  }
  els.messages.append(div);
  scrollDown();
  return div;
}

function scrollDown() {
  els.messages.scrollTop = els.messages.scrollHeight;
}

// ---- SSE over fetch: events are separated by a blank line; each "data:" line carries one JSON chunk ----
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let sep;
    while ((sep = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, sep);
      buffer = buffer.slice(sep).replace(/^\r?\n\r?\n/, "");
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
      if (data.length) yield data.join("\n");
    }
  }
}

async function send(text) {
  showError("");
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const div = addMessage("assistant");
  div.classList.add("streaming");
  const thinking = div.querySelector(".thinking");
  const thinkingBody = div.querySelector(".thinking-body");
  const summary = thinking.querySelector("summary");
  const content = div.querySelector(".content");
  const meta = div.querySelector(".meta");

  const messages = els.system.value.trim() ? [{ role: "system", content: els.system.value.trim() }] : [];
  const body = {
    model: els.model.value, messages: messages.concat(history), stream: true,
    stream_options: { include_usage: true }, temperature: Number(els.temperature.value),
    top_p: Number(els.topP.value), max_tokens: Number(els.maxTokens.value) || undefined,
  };
  controller = new AbortController();
  setBusy(true);
  const t0 = performance.now();
  let tThink = null;
  let answer = "";
  let finish = null;
  let usage = null;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!r.ok) throw new Error(await errorMessage(r));
    for await (const data of sseData(r)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices) {
        const d = choice.delta || {};
        const reasoning = d.reasoning_content ?? d.reasoning;
        if (reasoning) {
          thinking.hidden = false;
          if (!answer) thinking.open = true;
          thinkingBody.textContent += reasoning;
        }
        if (d.content) {
          if (!answer && !thinking.hidden) { // the answer starts: fold the thinking away
            tThink = (performance.now() - t0) / 1000;
            summary.textContent = `Thought for ${tThink.toFixed(1)} s`;
            thinking.open = els.showThinking.checked;
          }
          answer += d.content;
          content.textContent = answer;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      scrollDown();
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else showError(e.message);
  } finally {
    controller = null;
    setBusy(false);
    div.classList.remove("streaming");
  }
  if (!answer && !thinking.hidden) { // stopped inside the reasoning: there is no answer (content: null)
    summary.textContent = "Thinking (no answer: the output ended inside the reasoning)";
    thinking.open = true;
  }
  const secs = (performance.now() - t0) / 1000;
  const parts = [];
  if (usage) {
    const reasoningTokens = usage.completion_tokens_details ? usage.completion_tokens_details.reasoning_tokens : 0;
    parts.push(`${usage.completion_tokens} tokens` + (reasoningTokens ? ` (${reasoningTokens} thinking)` : ""));
    parts.push(`${(usage.completion_tokens / secs).toFixed(1)} tok/s`);
  }
  if (finish) parts.push(`finish: ${finish}`);
  meta.textContent = parts.join(" · ");
  history.push({ role: "assistant", content: answer });
}

function setBusy(busy) {
  els.send.hidden = busy;
  els.stop.hidden = !busy;
  els.prompt.disabled = busy;
  if (!busy) els.prompt.focus();
}

// ---- wiring ----
els.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  const text = els.prompt.value.trim();
  if (!text || controller) return;
  els.prompt.value = "";
  send(text);
});
els.prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    els.composer.requestSubmit();
  }
});
els.stop.addEventListener("click", () => controller && controller.abort());
els.newChat.addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  els.messages.replaceChildren(els.empty);
  els.empty.hidden = false;
  showError("");
});
els.toggleSettings.addEventListener("click", () => {
  els.settings.hidden = !els.settings.hidden;
  els.toggleSettings.setAttribute("aria-expanded", String(!els.settings.hidden));
});
for (const k of SETTINGS) els[k].addEventListener("input", saveSettings);
els.apiKey.addEventListener("change", loadModels);

loadSettings();
loadModels();
