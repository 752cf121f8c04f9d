// shardline's chat page. Plain JavaScript, no dependency, nothing fetched from elsewhere.
//
// Safety rule: text from the model or the user reaches the DOM only through escapeHtml (or
// textContent). renderMarkdown escapes the whole text first and then adds markup to the
// escaped text, so no character the model writes can open a tag or an attribute.
"use strict";

(() => {
  const KEY_STORAGE = "shardline.apiKey"; // sessionStorage: this tab only
  const SETTINGS_STORAGE = "shardline.settings"; // localStorage: not secret
  const STATUS_PERIOD_MS = 1500;

  // ---------------------------------------------------------------- safe Markdown

  function escapeHtml(text) {
    return String(text)
      .replace(/\u0000/g, "\uFFFD") // placeholders below use NUL; the text never does
      .replace(/&/g, "&amp;")
      .replace(/</g, "&lt;")
      .replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;")
      .replace(/'/g, "&#39;");
  }

  // Inline markup on one line of ALREADY ESCAPED text. Code spans and links are set aside
  // first (as NUL-delimited placeholders) so emphasis never reaches into them.
  function renderInline(escaped) {
    const stash = [];
    const keep = (html) => `\u0000${stash.push(html) - 1}\u0000`;
    let s = escaped.replace(/(`+)([^`]|[^`].*?[^`])\1(?!`)/g, (_, _ticks, code) => keep(`<code>${code}</code>`));
    s = s.replace(/\[([^\]]+)\]\((https?:\/\/[^\s()]+)\)/g, (_, label, url) =>
      keep(`<a href="${url}" rel="noopener noreferrer nofollow" target="_blank">${renderEmphasis(label)}</a>`));
    s = renderEmphasis(s);
    return s.replace(/\u0000(\d+)\u0000/g, (_, i) => stash[Number(i)]);
  }

  function renderEmphasis(s) {
    return s
      .replace(/\*\*(?=\S)(.+?)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^\w])__(?=\S)(.+?)__(?!\w)/g, "$1<strong>$2</strong>")
      .replace(/(^|[^*\w])\*(?=[^\s*])(.+?)\*(?![*\w])/g, "$1<em>$2</em>")
      .replace(/(^|[^_\w])_(?=[^\s_])(.+?)_(?![_\w])/g, "$1<em>$2</em>")
      .replace(/~~(?=\S)(.+?)~~/g, "<del>$1</del>");
  }

  const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([\w+#.-]*)\s*$/;
  const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
  const BULLET = /^\s{0,3}[-*+]\s+(.*)$/;
  const NUMBERED = /^\s{0,3}(\d{1,9})[.)]\s+(.*)$/;
  const QUOTE = /^\s{0,3}&gt;\s?(.*)$/; // the text is escaped: ">" is "&gt;" here

  // Markdown (a safe subset: paragraphs, line breaks, headings, lists, quotes, rules, fenced
  // code, inline code, emphasis, http(s) links) to HTML. Everything is escaped FIRST. A code
  // block still open at the end (an answer being streamed) is shown as code so far.
  function renderMarkdown(text) {
    const lines = escapeHtml(text).replace(/\r\n?/g, "\n").split("\n");
    const out = [];
    let para = [];
    const flush = () => {
      if (para.length) out.push(`<p>${para.map(renderInline).join("<br>")}</p>`);
      para = [];
    };
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if ((m = FENCE.exec(line))) {
        flush();
        const fence = m[1];
        const close = new RegExp(`^\\s{0,3}${fence[0] === "`" ? "`" : "~"}{${fence.length},}\\s*$`);
        const code = [];
        for (i += 1; i < lines.length && !close.test(lines[i]); i += 1) code.push(lines[i]);
        i += 1;
        const lang = m[2] ? `<span class="lang">${m[2]}</span>` : "";
        out.push(`<pre>${lang}<code>${code.join("\n")}</code></pre>`);
        continue;
      }
      if (!line.trim()) {
        flush();
      } else if ((m = HEADING.exec(line))) {
        flush();
        out.push(`<h${m[1].length}>${renderInline(m[2])}</h${m[1].length}>`);
      } else if (RULE.test(line)) {
        flush();
        out.push("<hr>");
      } else if (BULLET.test(line) || NUMBERED.test(line)) {
        flush();
        const numbered = !BULLET.test(line);
        const pattern = numbered ? NUMBERED : BULLET;
        const items = [];
        const start = numbered ? Number(NUMBERED.exec(line)[1]) : 1;
        while (i < lines.length && (m = pattern.exec(lines[i]))) {
          items.push(`<li>${renderInline(numbered ? m[2] : m[1])}</li>`);
          i += 1;
        }
        const attrs = numbered && start !== 1 ? ` start="${start}"` : "";
        out.push(numbered ? `<ol${attrs}>${items.join("")}</ol>` : `<ul>${items.join("")}</ul>`);
        continue;
      } else if (QUOTE.test(line)) {
        flush();
        const quoted = [];
        while (i < lines.length && (m = QUOTE.exec(lines[i]))) {
          quoted.push(renderInline(m[1]));
          i += 1;
        }
        out.push(`<blockquote>${quoted.join("<br>")}</blockquote>`);
        continue;
      } else {
        para.push(line);
      }
      i += 1;
    }
    flush();
    return out.join("");
  }

  // ---------------------------------------------------------------- Prometheus text

  // name -> the values of its samples (one per label set), from the text exposition format.
  function parseMetrics(text) {
    const values = {};
    for (const line of text.split("\n")) {
      if (!line || line[0] === "#") continue;
      const m = /^([A-Za-z_:][\w:]*)(\{.*\})?\s+(\S+)/.exec(line);
      if (m) (values[m[1]] = values[m[1]] || []).push(Number(m[3]));
    }
    return values;
  }

  const sum = (xs) => xs.reduce((a, b) => a + b, 0);

  // ---------------------------------------------------------------- server calls

  class KeyNeeded extends Error {}

  const state = {
    key: sessionStorage.getItem(KEY_STORAGE),
    model: null,
    history: [], // {role, content} sent with the next request
    controller: null,
    statusTimer: null,
  };

  function headers(extra) {
    const h = Object.assign({}, extra);
    if (state.key) h.Authorization = `Bearer ${state.key}`;
    return h;
  }

  async function api(path, init) {
    const options = Object.assign({}, init || {});
    options.headers = headers(options.headers);
    const response = await fetch(path, options);
    if (response.status === 401) {
      askForKey(state.key ? "The server refused that key." : "");
      throw new KeyNeeded("API key required");
    }
    return response;
  }

  async function errorText(response) {
    const text = await response.text();
    try {
      const body = JSON.parse(text);
      if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
    } catch (_) {
      // not JSON: show the text itself
    }
    return `${response.status}: ${text || response.statusText}`;
  }

  // The `data:` payloads of a server-sent event stream, as strings.
  async function* sseData(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer = (buffer + value).replace(/\r\n/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = event
            .split("\n")
            .filter((l) => l.startsWith("data:"))
            .map((l) => l.slice(5).replace(/^ /, ""))
            .join("\n");
          if (data) yield data;
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  // ---------------------------------------------------------------- page

  const $ = (id) => document.getElementById(id);

  function showError(message) {
    const box = $("error");
    box.textContent = message || "";
    box.hidden = !message;
  }

  function askForKey(problem) {
    const dialog = $("key-dialog");
    $("key-error").textContent = problem || "";
    $("key-error").hidden = !problem;
    if (!dialog.open) dialog.showModal();
    $("key-input").focus();
  }

  async function loadModel() {
    try {
      const response = await api("/v1/models");
      if (!response.ok) throw new Error(await errorText(response));
      const body = await response.json();
      state.model = body.data && body.data.length ? body.data[0].id : null;
      $("st-model").textContent = state.model || "none";
      showError("");
    } catch (err) {
      if (!(err instanceof KeyNeeded)) showError(`Cannot list the models: ${err.message}`);
    }
  }

  async function refreshStatus() {
    try {
      const health = await fetch("/health", { headers: headers() });
      $("st-health").textContent = health.ok ? "healthy" : "engine down";
      $("st-health").className = `item ${health.ok ? "ok" : "bad"}`;
    } catch (_) {
      $("st-health").textContent = "unreachable";
      $("st-health").className = "item bad";
    }
    try {
      const response = await fetch("/metrics", { headers: headers() });
      if (!response.ok) return;
      const values = parseMetrics(await response.text());
      const running = values["shardline:num_requests_running"];
      const waiting = values["shardline:num_requests_waiting"];
      const kv = values["shardline:kv_cache_usage_perc"];
      $("st-running").textContent = running ? String(sum(running)) : "–";
      $("st-waiting").textContent = waiting ? String(sum(waiting)) : "–";
      $("st-kv").textContent = kv && kv.length ? `${((100 * sum(kv)) / kv.length).toFixed(1)}%` : "–";
    } catch (_) {
      // the health item already says the server is unreachable
    }
  }

  function formatSeconds(ms) {
    return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
  }

  function addMessage(role, text) {
    $("empty").hidden = true;
    const box = document.createElement("div");
    box.className = `msg ${role}`;
    const label = document.createElement("div");
    label.className = "role";
    label.textContent = role;
    const body = document.createElement("div");
    body.className = "body";
    const meta = document.createElement("div");
    meta.className = "meta";
    box.append(label, body, meta);
    $("transcript").append(box);
    const view = {
      box,
      text,
      pending: false,
      render() {
        view.pending = false;
        const transcript = $("transcript");
        const atBottom = transcript.scrollHeight - transcript.scrollTop - transcript.clientHeight < 40;
        body.innerHTML = renderMarkdown(view.text); // escaped first: see renderMarkdown
        if (atBottom) transcript.scrollTop = transcript.scrollHeight;
      },
      update(newText) {
        view.text = newText;
        if (!view.pending) {
          view.pending = true;
          requestAnimationFrame(view.render);
        }
      },
      note(text) {
        meta.textContent = text;
      },
    };
    view.render();
    $("transcript").scrollTop = $("transcript").scrollHeight; // a new message: show it
    return view;
  }

  function readSettings() {
    const number = (id, parse) => {
      const raw = $(id).value.trim();
      return raw === "" ? undefined : parse(raw);
    };
    return {
      system: $("set-system").value,
      temperature: number("set-temperature", Number),
      top_p: number("set-top-p", Number),
      max_tokens: number("set-max-tokens", Number),
      seed: number("set-seed", Number),
      schema: $("set-schema").value,
    };
  }

  // The schema box as response_format (null: none asked); throws naming the problem when the
  // text is not a JSON object.
  function responseFormat(text) {
    if (!text.trim()) return null;
    let schema;
    try {
      schema = JSON.parse(text);
    } catch (err) {
      throw new Error(`The JSON schema is not valid JSON: ${err.message}`);
    }
    if (schema === null || typeof schema !== "object" || Array.isArray(schema)) {
      throw new Error("The JSON schema must be a JSON object");
    }
    return { type: "json_schema", json_schema: { name: "schema", schema } };
  }

  const SETTING_FIELDS = ["set-system", "set-temperature", "set-top-p", "set-max-tokens", "set-seed", "set-schema"];

  function loadSettings() {
    let saved = {};
    try {
      saved = JSON.parse(localStorage.getItem(SETTINGS_STORAGE) || "{}") || {};
    } catch (_) {
      saved = {};
    }
    for (const id of SETTING_FIELDS) if (typeof saved[id] === "string") $(id).value = saved[id];
  }

  function saveSettings() {
    const values = {};
    for (const id of SETTING_FIELDS) values[id] = $(id).value;
    localStorage.setItem(SETTINGS_STORAGE, JSON.stringify(values));
  }

  function setBusy(busy) {
    $("send").hidden = busy;
    $("stop").hidden = !busy;
  }

  async function send(text) {
    if (state.controller) return;
    if (!state.model) await loadModel();
    if (!state.model) return;
    showError("");
    const settings = readSettings();
    let format;
    try {
      format = responseFormat(settings.schema);
    } catch (err) {
      showError(err.message); // nothing is sent
      return false;
    }
    const request = {
      model: state.model,
      messages: [
        ...(settings.system.trim() ? [{ role: "system", content: settings.system }] : []),
        ...state.history,
        { role: "user", content: text },
      ],
      stream: true,
      stream_options: { include_usage: true },
    };
    for (const name of ["temperature", "top_p", "max_tokens", "seed"]) {
      if (settings[name] !== undefined) request[name] = settings[name];
    }
    if (format) request.response_format = format;
    addMessage("user", text);
    const view = addMessage("assistant", "");
    view.box.classList.add("streaming");
    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);
    $("st-tps").textContent = "–";
    $("st-ttft").textContent = "…";

    const started = performance.now();
    let first = null;
    let last = null;
    let chunks = 0;
    let tokens = null; // from the usage chunk, once it comes
    let finish = null;
    let answer = "";
    const speed = () => {
      const n = tokens !== null ? tokens : chunks;
      return n > 1 && last > first ? ((n - 1) * 1000) / (last - first) : null;
    };
    try {
      const response = await api("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(request),
        signal: controller.signal,
      });
      if (!response.ok) throw new Error(await errorText(response));
      for await (const data of sseData(response.body)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
        if (chunk.usage) tokens = chunk.usage.completion_tokens;
        for (const choice of chunk.choices || []) {
          const delta = choice.delta && choice.delta.content;
          if (delta) {
            const now = performance.now();
            if (first === null) {
              first = now;
              $("st-ttft").textContent = formatSeconds(first - started);
            }
            last = now;
            chunks += 1;
            answer += delta;
            view.update(answer);
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        const tps = speed();
        if (tps !== null) $("st-tps").textContent = tps.toFixed(1);
      }
      state.history.push({ role: "user", content: text }, { role: "assistant", content: answer });
    } catch (err) {
      if (controller.signal.aborted) {
        finish = "stopped";
        // What was said so far stays part of the conversation.
        state.history.push({ role: "user", content: text }, { role: "assistant", content: answer });
      } else {
        finish = "error";
        view.box.classList.add("error-msg");
        const message = err instanceof KeyNeeded ? "API key required" : err.message;
        showError(`The request failed: ${message}`);
        view.note(message);
      }
    } finally {
      view.box.classList.remove("streaming");
      view.render();
      state.controller = null;
      setBusy(false);
      refreshStatus(); // the engine's counts without this request, not 1.5 s later
    }
    if (finish !== "error") {
      const parts = [`${tokens !== null ? tokens : chunks} tokens`];
      const tps = speed();
      if (tps !== null) parts.push(`${tps.toFixed(1)} tok/s`);
      if (first !== null) parts.push(`first token after ${formatSeconds(first - started)}`);
      if (finish === "stopped") parts.push("stopped");
      else if (finish === "length") parts.push("cut at max_tokens");
      view.note(parts.join(" · "));
    }
  }

  function newChat() {
    if (state.controller) state.controller.abort();
    state.history = [];
    for (const node of [...$("transcript").querySelectorAll(".msg")]) node.remove();
    $("empty").hidden = false;
    $("st-tps").textContent = "–";
    $("st-ttft").textContent = "–";
    showError("");
    $("prompt").focus();
  }

  function start() {
    loadSettings();
    for (const id of SETTING_FIELDS) $(id).addEventListener("input", saveSettings);
    $("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      const text = $("prompt").value;
      if (!text.trim() || state.controller) return;
      $("prompt").value = "";
      send(text).then((sent) => {
        if (sent === false) $("prompt").value = text; // refused here (a bad schema): keep the message
      });
    });
    $("prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        $("composer").requestSubmit();
      }
    });
    $("stop").addEventListener("click", () => {
      if (state.controller) state.controller.abort();
    });
    $("new-chat").addEventListener("click", newChat);
    $("toggle-settings").addEventListener("click", () => {
      const panel = $("settings");
      panel.hidden = !panel.hidden;
      $("toggle-settings").setAttribute("aria-expanded", String(!panel.hidden));
    });
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("key-input").value.trim();
      if (!key) return;
      state.key = key;
      sessionStorage.setItem(KEY_STORAGE, key);
      $("key-dialog").close();
      $("key-input").value = "";
      loadModel();
    });
    loadModel();
    refreshStatus();
    state.statusTimer = setInterval(refreshStatus, STATUS_PERIOD_MS);
    $("prompt").focus();
  }

  // For the tests (and the curious): the renderer and the metrics parser.
  window.shardline = { escapeHtml, renderMarkdown, parseMetrics };
  start();
})();
