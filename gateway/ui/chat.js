// The chat page: model picker, parameters, streamed answers over a WebSocket (SSE fallback),
// Stop, and per-answer figures (tier, TTFT, tokens/s, masked personal data).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const ui = {
    model: $("model"), system: $("system"), temperature: $("temperature"), topP: $("top_p"),
    maxTokens: $("max_tokens"), apiKey: $("api_key"), clear: $("clear"), status: $("status"),
    log: $("log"), form: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
  };
  const WS_PATH = "/v1/chat/completions/ws";
  const SSE_PATH = "/v1/chat/completions";
  const TIER_NAMES = {local: "A · local", gpu: "B · GPU", external: "C · external"};

  let history = [];   // {role, content} of finished turns
  let running = null; // the answer being generated: {stop(), ...}

  ui.apiKey.value = sessionStorage.getItem("slm.api_key") || "";
  ui.apiKey.addEventListener("change", () => sessionStorage.setItem("slm.api_key", ui.apiKey.value));

  function setStatus(text) { ui.status.textContent = text; }

  async function loadModels() {
    const key = ui.apiKey.value.trim();
    const reply = await slm.request("GET", "/v1/models", {key});
    ui.model.replaceChildren();
    if (!reply.ok) {
      ui.model.append(slm.el("option", {value: ""}, "no models"));
      setStatus(`Models unavailable: ${slm.errorText(reply.status, reply.body)}`);
      return;
    }
    const models = (reply.body.data || []).map((m) => m.id);
    const saved = sessionStorage.getItem("slm.model");
    for (const id of models) ui.model.append(slm.el("option", {value: id, selected: id === saved}, id));
    if (!models.length) ui.model.append(slm.el("option", {value: ""}, "no models"));
    setStatus(models.length ? `${models.length} model(s) available` : "No models are served");
  }
  ui.model.addEventListener("change", () => sessionStorage.setItem("slm.model", ui.model.value));

  function numberOf(input) {
    const value = Number(input.value);
    return input.value === "" || Number.isNaN(value) ? undefined : value;
  }

  function requestBody() {
    const messages = [];
    if (ui.system.value.trim()) messages.push({role: "system", content: ui.system.value.trim()});
    messages.push(...history);
    return {
      model: ui.model.value,
      messages,
      temperature: numberOf(ui.temperature),
      top_p: numberOf(ui.topP),
      max_tokens: numberOf(ui.maxTokens),
      stream: true,
      stream_options: {include_usage: true},
    };
  }

  // Stream one chat request; handlers get each JSON chunk, then exactly one of done/fail.
  function streamChat(body, key, handlers) {
    let finished = false;
    let socket = null;
    let abort = null;
    const finish = (fn, arg) => { if (!finished) { finished = true; fn(arg); } };

    function viaSse() {
      abort = new AbortController();
      const headers = {"content-type": "application/json"};
      if (key) headers.authorization = `Bearer ${key}`;
      fetch(SSE_PATH, {method: "POST", headers, body: JSON.stringify(body), signal: abort.signal})
        .then(async (response) => {
          if (!response.ok) {
            let parsed = null;
            try { parsed = await response.json(); } catch (_) { /* not JSON */ }
            return finish(handlers.fail, slm.errorText(response.status, parsed));
          }
          const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
          let buffer = "";
          for (;;) {
            const {value, done} = await reader.read();
            if (done) return finish(handlers.done);
            buffer += value;
            let cut;
            while ((cut = buffer.indexOf("\n\n")) >= 0) {
              const event = buffer.slice(0, cut);
              buffer = buffer.slice(cut + 2);
              if (!event.startsWith("data: ")) continue;
              const data = event.slice(6);
              if (data === "[DONE]") return finish(handlers.done);
              handlers.chunk(JSON.parse(data));
            }
          }
        })
        .catch((error) => { if (error.name !== "AbortError") finish(handlers.fail, error.message); });
    }

    socket = new WebSocket(slm.wsUrl(WS_PATH));
    let opened = false;
    socket.onopen = () => {
      opened = true;
      socket.send(JSON.stringify(key ? {...body, api_key: key} : body));
    };
    socket.onmessage = (event) => {
      if (event.data === "[DONE]") { socket.close(1000); finish(handlers.done); return; }
      handlers.chunk(JSON.parse(event.data));
    };
    socket.onerror = () => {
      // A proxy without WebSocket upgrades: the same chunks come over SSE instead.
      if (!opened && !finished) { socket = null; viaSse(); }
    };
    socket.onclose = (event) => {
      if (opened) finish(handlers.fail, `connection closed (${event.code}${event.reason ? ": " + event.reason : ""})`);
    };

    return {
      stop() {
        if (finished) return;
        finished = true;
        // Closing the socket (or the HTTP stream) cancels generation all the way to the engine.
        if (socket) socket.close(1000, "stopped by user");
        if (abort) abort.abort();
        handlers.stopped();
      },
    };
  }

  function addMessage(role, text) {
    const body = slm.el("div", {class: "text"}, text);
    const item = slm.el("li", {class: `message ${role}`},
      slm.el("div", {class: "role"}, role === "user" ? "You" : role), body);
    ui.log.append(item);
    item.scrollIntoView({block: "end"});
    return {item, body};
  }

  function figures(answer) {
    const parts = [];
    const slmInfo = answer.slm || {};
    if (slmInfo.tier) parts.push(slm.el("span", {class: "figure", title: slmInfo.upstream || ""}, `tier ${TIER_NAMES[slmInfo.tier] || slmInfo.tier}`));
    if (answer.ttftMs !== null) parts.push(slm.el("span", {class: "figure"}, `TTFT ${answer.ttftMs.toFixed(0)} ms`));
    if (answer.usage) {
      const seconds = (answer.endMs - (answer.firstMs ?? answer.endMs)) / 1000;
      const after = Math.max(answer.usage.completion_tokens - 1, 0);
      if (seconds > 0 && after > 0) parts.push(slm.el("span", {class: "figure"}, `${(after / seconds).toFixed(1)} tokens/s`));
      parts.push(slm.el("span", {class: "figure"}, `${answer.usage.completion_tokens} tokens`));
    }
    if (answer.finish) parts.push(slm.el("span", {class: "figure"}, `finish: ${answer.finish}`));
    const masked = Object.entries(slmInfo.masked_entities || {});
    if (masked.length) {
      const total = masked.reduce((n, [, count]) => n + count, 0);
      const detail = masked.map(([type, count]) => `${type} ×${count}`).join(", ");
      parts.push(slm.el("span", {class: "masked", title: "Replaced by placeholders before the request left the mesh, restored in this answer"},
        `Personal data: ${total} item(s) masked upstream and restored (${detail})`));
    }
    return slm.el("div", {class: "figures", "data-testid": "figures"}, ...parts);
  }

  function setRunning(on) {
    ui.send.disabled = on;
    ui.stop.disabled = !on;
    ui.log.setAttribute("aria-busy", on ? "true" : "false");
  }

  function send() {
    const text = ui.prompt.value.trim();
    if (!text || running) return;
    if (!ui.model.value) { setStatus("Pick a model first"); return; }
    history.push({role: "user", content: text});
    addMessage("user", text);
    ui.prompt.value = "";
    const view = addMessage("assistant", "");
    view.item.classList.add("streaming");
    const answer = {text: "", startMs: performance.now(), firstMs: null, ttftMs: null, endMs: null, usage: null, finish: null, slm: null};
    setRunning(true);
    setStatus("Generating…");

    const end = (state, message) => {
      answer.endMs = answer.endMs ?? performance.now();
      view.item.classList.remove("streaming");
      view.item.classList.add(state);
      running = null;
      setRunning(false);
      if (answer.text) history.push({role: "assistant", content: answer.text});
      if (message) view.item.append(slm.el("p", {class: "error", role: "alert"}, message));
      view.item.append(figures(answer));
      setStatus(state === "done" ? "Done" : state === "stopped" ? "Stopped" : "Failed");
      ui.prompt.focus();
    };

    running = streamChat(requestBody(), ui.apiKey.value.trim(), {
      chunk(chunk) {
        if (chunk.error) { answer.error = chunk.error.message; return; }
        const choice = (chunk.choices || [])[0];
        const delta = choice && choice.delta && choice.delta.content;
        if (delta) {
          if (answer.firstMs === null) {
            answer.firstMs = performance.now();
            answer.ttftMs = answer.firstMs - answer.startMs;
          }
          answer.text += delta;
          view.body.textContent = answer.text;
          view.item.scrollIntoView({block: "end"});
        }
        if (choice && choice.finish_reason) { answer.finish = choice.finish_reason; answer.endMs = performance.now(); }
        if (chunk.slm) answer.slm = chunk.slm;
        if (chunk.usage) answer.usage = chunk.usage;
      },
      done() { end(answer.error ? "failed" : "done", answer.error); },
      fail(message) { end("failed", message); },
      stopped() { answer.finish = "stopped by you"; end("stopped"); },
    });
  }

  ui.form.addEventListener("submit", (event) => { event.preventDefault(); send(); });
  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); send(); }
  });
  ui.stop.addEventListener("click", () => { if (running) running.stop(); });
  ui.clear.addEventListener("click", () => {
    if (running) running.stop();
    history = [];
    ui.log.replaceChildren();
    setStatus("New conversation");
  });
  ui.apiKey.addEventListener("change", loadModels);
  loadModels();
})();
