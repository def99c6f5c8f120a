// nanoseek web chat: streams /v1/chat/completions (fetch + ReadableStream, SSE parsed by hand: EventSource
// cannot POST or send an Authorization header). Text is inserted with textContent only, never as HTML.
// With a Janus model (the model card's modalities include "image") an Images tab streams /v1/images/generations
// (progress events, then each image), and an image can be attached to a chat message (a data URL content part).
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  model: $("model"), newChat: $("new-chat"), toggleSettings: $("toggle-settings"), settings: $("settings"),
  apiKey: $("api-key"), system: $("system"), temperature: $("temperature"), temperatureValue: $("temperature-value"),
  topP: $("top-p"), topPValue: $("top-p-value"), maxTokens: $("max-tokens"), showThinking: $("show-thinking"),
  messages: $("messages"), empty: $("empty"), error: $("error"), composer: $("composer"), prompt: $("prompt"),
  send: $("send"), stop: $("stop"),
  tabs: $("tabs"), tabChat: $("tab-chat"), tabImages: $("tab-images"), imagesView: $("images-view"),
  imageForm: $("image-form"), imagePrompt: $("image-prompt"), imageN: $("image-n"), imageSeed: $("image-seed"),
  imageGuidance: $("image-guidance"), imageGuidanceValue: $("image-guidance-value"), generate: $("generate"),
  imageStop: $("image-stop"), imageProgress: $("image-progress"), imageProgressBar: $("image-progress-bar"),
  imageStatus: $("image-status"), gallery: $("gallery"), galleryEmpty: $("gallery-empty"),
  attach: $("attach"), imageFile: $("image-file"), attachment: $("attachment"),
  attachmentPreview: $("attachment-preview"), attachmentName: $("attachment-name"),
  attachmentRemove: $("attachment-remove"),
};
const history = []; // {role, content}: the answers only; R1 is not shown its past reasoning
let controller = null;
let imageController = null;
let models = []; // the server's model cards
let attached = null; // {url, name}: the image going with the next message

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
    models = data;
    els.model.replaceChildren(...data.map((m) => new Option(m.id, m.id)));
    showCapabilities();
    showError("");
  } catch (e) {
    showError(`cannot reach the server: ${e.message}`);
  }
}

// ---- what the model does: a Janus model reads and writes images (the model card's modalities) ----
function currentModel() {
  return models.find((m) => m.id === els.model.value) || {};
}

function showCapabilities() {
  const m = currentModel();
  const reads = (m.input_modalities || []).includes("image");
  const writes = (m.output_modalities || []).includes("image");
  els.tabs.hidden = !writes;
  els.attach.hidden = !reads;
  if (!reads) clearAttachment();
  if (!writes) showView("chat");
}

function showView(view) {
  const images = view === "images";
  els.messages.hidden = images;
  els.composer.hidden = images;
  els.attachment.hidden = images || !attached;
  els.imagesView.hidden = !images;
  els.tabChat.setAttribute("aria-selected", String(!images));
  els.tabImages.setAttribute("aria-selected", String(images));
  showError("");
  (images ? els.imagePrompt : els.prompt).focus();
}

// ---- an image attached to the next chat message: read as a data URL, sent as an image_url content part ----
function attachFile(file) {
  if (!file) return;
  if (!["image/png", "image/jpeg"].includes(file.type)) {
    showError(`${file.name}: only PNG and JPEG images can be attached`);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    const img = new Image();
    img.onload = () => {
      attached = { url: shrink(img, reader.result, file.type), name: file.name };
      els.attachmentPreview.src = attached.url;
      els.attachmentName.textContent = file.name;
      els.attachment.hidden = false;
      showError("");
    };
    img.onerror = () => showError(`${file.name} is not an image this browser can read`);
    img.src = reader.result;
  };
  reader.onerror = () => showError(`cannot read ${file.name}`);
  reader.readAsDataURL(file);
}

// A camera photo is larger than the server's default body limit (4 MiB) and the model reads 384 px anyway: an
// image whose long side exceeds MAX_SIDE is scaled down here (same format) before it is sent; smaller ones go as
// they are, byte for byte.
const MAX_SIDE = 1024;

function shrink(img, url, type) {
  const scale = MAX_SIDE / Math.max(img.naturalWidth, img.naturalHeight);
  if (scale >= 1) return url;
  const canvas = document.createElement("canvas");
  canvas.width = Math.round(img.naturalWidth * scale);
  canvas.height = Math.round(img.naturalHeight * scale);
  canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
  return canvas.toDataURL(type, 0.92);
}

function clearAttachment() {
  attached = null;
  els.attachment.hidden = true;
  els.attachmentPreview.removeAttribute("src");
  els.imageFile.value = "";
}

// ---- messages ----
function addMessage(role, text, imageUrl) {
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
    if (imageUrl) {
      const img = document.createElement("img");
      img.className = "attached";
      img.alt = "attached image";
      img.src = imageUrl;
      div.append(img);
    }
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

async function send(text, image) {
  showError("");
  // with an image: OpenAI's content parts, the image first (Janus' own prompt order); it stays in the history
  const userContent = image ? [{ type: "image_url", image_url: { url: image.url } }, { type: "text", text }] : text;
  history.push({ role: "user", content: userContent });
  addMessage("user", text, image && image.url);
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
  els.attach.disabled = busy;
  if (!busy) els.prompt.focus();
}

// ---- images: /v1/images/generations streamed (progress events, then each image as it is decoded) ----
function seconds(s) {
  return s < 90 ? `${s.toFixed(0)} s` : `${(s / 60).toFixed(1)} min`;
}

async function generateImages(prompt) {
  showError("");
  const n = Math.max(1, Math.round(Number(els.imageN.value) || 1));
  const body = { model: els.model.value, prompt, n, stream: true, guidance_scale: Number(els.imageGuidance.value) };
  if (els.imageSeed.value !== "") body.seed = Number(els.imageSeed.value);
  els.galleryEmpty.hidden = true;
  const block = document.createElement("figure");
  block.className = "generation busy";
  const grid = document.createElement("div");
  grid.className = "grid";
  const slots = [];
  for (let i = 0; i < n; i++) {
    const slot = document.createElement("div");
    slot.className = "slot";
    grid.append(slot);
    slots.push(slot);
  }
  const caption = document.createElement("figcaption");
  caption.textContent = prompt;
  const meta = document.createElement("div");
  meta.className = "meta";
  block.append(grid, caption, meta);
  els.gallery.prepend(block);

  imageController = new AbortController();
  setImageBusy(true);
  const t0 = performance.now();
  let done = 0;
  let stopped = false;
  try {
    const r = await fetch("/v1/images/generations", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: imageController.signal,
    });
    if (!r.ok) throw new Error(await errorMessage(r));
    for await (const data of sseData(r)) {
      const event = JSON.parse(data);
      if (event.error) throw new Error(event.error.message);
      const elapsed = (performance.now() - t0) / 1000;
      if (event.type === "image_generation.progress") {
        els.imageProgressBar.value = (100 * event.step) / event.steps;
        const left = event.step ? (elapsed * (event.steps - event.step)) / event.step : 0;
        els.imageStatus.textContent = event.step < event.steps
          ? `sampling image tokens ${event.step}/${event.steps} · ${seconds(elapsed)}` +
            (event.step > 2 ? ` · about ${seconds(left)} left` : "")
          : `decoding ${n > 1 ? "the images" : "the image"} · ${seconds(elapsed)}`;
      } else if (event.type === "image_generation.completed") {
        const img = document.createElement("img");
        img.alt = prompt;
        img.src = `data:image/png;base64,${event.b64_json}`;
        const link = document.createElement("a");
        link.href = img.src;
        link.download = `nanoseek-${Date.now()}-${event.index ?? done}.png`;
        link.title = "download";
        link.append(img);
        slots[event.index ?? done].replaceChildren(link);
        done += 1;
      }
    }
  } catch (e) {
    if (e.name === "AbortError") stopped = true;
    else showError(e.message);
  } finally {
    imageController = null;
    setImageBusy(false);
    block.classList.remove("busy");
  }
  for (const slot of slots) if (!slot.childElementCount) slot.remove();
  const secs = (performance.now() - t0) / 1000;
  meta.textContent = [`${done} of ${n} image${n > 1 ? "s" : ""}`, seconds(secs),
    ...(body.seed !== undefined ? [`seed ${body.seed}`] : []), `guidance ${body.guidance_scale}`,
    ...(stopped ? ["stopped"] : [])].join(" · ");
}

function setImageBusy(busy) {
  els.generate.hidden = busy;
  els.imageStop.hidden = !busy;
  els.imagePrompt.disabled = busy;
  els.imageProgress.hidden = !busy;
  if (busy) {
    els.imageProgressBar.value = 0;
    els.imageStatus.textContent = "waiting for the engine…";
  } else {
    els.imagePrompt.focus();
  }
}

// ---- wiring ----
els.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  const text = els.prompt.value.trim();
  if (!text || controller) return;
  els.prompt.value = "";
  const image = attached;
  clearAttachment();
  send(text, image);
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
  clearAttachment();
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
els.model.addEventListener("change", showCapabilities);
els.tabChat.addEventListener("click", () => showView("chat"));
els.tabImages.addEventListener("click", () => showView("images"));
els.attach.addEventListener("click", () => els.imageFile.click());
els.imageFile.addEventListener("change", () => attachFile(els.imageFile.files[0]));
els.attachmentRemove.addEventListener("click", clearAttachment);
els.imageForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const prompt = els.imagePrompt.value.trim();
  if (!prompt || imageController) return;
  generateImages(prompt);
});
els.imagePrompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    els.imageForm.requestSubmit();
  }
});
els.imageStop.addEventListener("click", () => imageController && imageController.abort());
const showGuidance = () => { els.imageGuidanceValue.textContent = Number(els.imageGuidance.value).toFixed(1); };
els.imageGuidance.addEventListener("input", showGuidance);
showGuidance();

loadSettings();
loadModels();
