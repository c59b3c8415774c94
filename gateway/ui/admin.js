// The admin page: models (tier, state, memory), adapters, the request log, the ledger and live
// metrics, all through /admin/* with the key. An endpoint this gateway does not have shows
// "not available" instead of breaking the page.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const keyInput = $("admin_key");
  keyInput.value = sessionStorage.getItem("slm.admin_key") || "";
  const key = () => keyInput.value.trim();

  function state(id, text, kind) {
    const node = $(id);
    node.textContent = text;
    node.className = `state ${kind || ""}`;
  }

  // What a failed reply means to the operator.
  function explain(reply, what) {
    if (reply.status === 404 || reply.status === 405) return [`Not available: this gateway has no ${what} endpoint.`, "unavailable"];
    if (reply.status === 401) return ["Admin key required: enter it above.", "bad"];
    if (reply.status === 403) return [slm.errorText(reply.status, reply.body), "bad"];
    return [`Failed: ${slm.errorText(reply.status, reply.body)}`, "bad"];
  }

  // The list inside a reply, whatever the endpoint calls it.
  function rows(body, ...names) {
    if (Array.isArray(body)) return body;
    for (const name of [...names, "data", "items"]) if (body && Array.isArray(body[name])) return body[name];
    return [];
  }

  function cell(value) {
    if (value === null || value === undefined) return "";
    if (typeof value === "object") return JSON.stringify(value);
    return String(value);
  }

  // A table of objects: columns are their keys, in first-seen order, at most `limit` of them.
  function table(id, items, {actions, limit = 8} = {}) {
    const columns = [];
    for (const item of items) for (const name of Object.keys(item)) if (!columns.includes(name)) columns.push(name);
    const shown = columns.slice(0, limit);
    const head = slm.el("tr", {}, ...shown.map((c) => slm.el("th", {scope: "col"}, c)), actions ? slm.el("th", {scope: "col"}, "") : null);
    const body = items.map((item) => slm.el("tr", {},
      ...shown.map((c) => slm.el("td", {class: /hash|id|sha/.test(c) ? "mono" : ""}, cell(item[c]))),
      actions ? slm.el("td", {}, actions(item)) : null));
    $(id).replaceChildren(items.length ? slm.el("table", {}, slm.el("thead", {}, head), slm.el("tbody", {}, ...body)) : "");
  }

  // `load` now, then again `ms` after each run has finished, so a slow reply never stacks
  // requests behind it.
  function every(ms, load) {
    const run = async () => {
      try { await load(); } finally { setTimeout(run, ms); }
    };
    run();
  }

  const MiB = 1048576;
  const mib = (bytes) => bytes ? `${(bytes / MiB).toFixed(0)} MiB` : "";

  // --- models --------------------------------------------------------------------------------
  // The outcome of the last load or unload, kept beside the live summary until the next one.
  let modelsNote = null;

  function modelsState(summary, kind) {
    if (!modelsNote) return state("models-state", summary, kind);
    state("models-state", `${summary} · ${modelsNote.text}`, modelsNote.kind === "bad" ? "bad" : kind);
  }

  async function loadModels() {
    const reply = await slm.request("GET", "/admin/models", {key: key()});
    if (reply.ok) {
      const items = rows(reply.body, "models");
      // Each inference-local replica answers for itself; one that did not is named here.
      const replicas = Array.isArray(reply.body.replicas) ? reply.body.replicas : [];
      const down = replicas.filter((r) => !r.ok).map((r) => r.address);
      modelsState(`${items.length} model(s) on ${replicas.length || 1} replica(s)` + (down.length ? `; not answering: ${down.join(", ")}` : ""), down.length ? "bad" : "good");
      const loadedOn = (m) => Array.isArray(m.replicas) ? `${m.replicas.filter((r) => r.loaded).length}/${replicas.length}` : "";
      // tier: where the manifest keeps it; state: what of it is in memory (the most any
      // replica holds); memory: what all replicas hold of it together.
      const view = items.map((m) => ({
        name: m.id || m.name,
        tier: m.tier || "",
        state: m.state || (m.loaded === undefined ? "" : (m.loaded ? "loaded" : "unloaded")),
        memory: mib(m.memory_bytes),
        "loaded on": loadedOn(m),
        "warmed by": (m.co_activation || []).join(", "),
        context: m.context_length,
        size: mib(m.size_bytes),
        pinned: m.pinned ? "yes" : "",
      }));
      table("models-table", view, {limit: 9, actions: (m) => m.state === "unloaded" ? "" : slm.el("button", {type: "button", class: "danger", onclick: () => unload(m.name)}, "Unload")});
      return;
    }
    const [text, kind] = explain(reply, "/admin/models");
    // Without the admin listing, show what clients can use, so the page still says something.
    const served = await slm.request("GET", "/v1/models");
    state("models-state", served.ok ? `${text} Served models (from /v1/models):` : text, kind);
    table("models-table", served.ok ? rows(served.body) : [], {actions: (m) => slm.el("button", {type: "button", class: "danger", onclick: () => unload(m.id)}, "Unload")});
  }

  async function unload(name) {
    const reply = await slm.request("POST", "/admin/models/unload", {key: key(), body: {name}});
    if (!reply.ok) {
      const [text, kind] = explain(reply, "/admin/models/unload");
      modelsNote = {text, kind};
      return state("models-state", text, kind);
    }
    modelsNote = {text: `Unloaded ${name}`, kind: "good"};
    loadModels();
  }

  $("load-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = new FormData(event.target);
    const body = {name: form.get("name")};
    if (form.get("path")) body.path = form.get("path");
    modelsNote = {text: `Loading ${body.name}…`};
    state("models-state", modelsNote.text);
    const reply = await slm.request("POST", "/admin/models/load", {key: key(), body});
    if (!reply.ok) {
      const [text, kind] = explain(reply, "/admin/models/load");
      modelsNote = {text, kind};
      return state("models-state", text, kind);
    }
    modelsNote = {text: `Loaded ${body.name}`, kind: "good"};
    loadModels();
  });

  // --- adapters ------------------------------------------------------------------------------
  async function loadAdapters() {
    const reply = await slm.request("GET", "/admin/adapters", {key: key()});
    if (!reply.ok) {
      table("adapters-table", []);
      return state("adapters-state", ...explain(reply, "/admin/adapters"));
    }
    const items = rows(reply.body, "adapters");
    state("adapters-state", `${items.length} adapter(s)`, "good");
    const view = items.map((a) => ({name: a.name, base_model: a.base_model, format: a.format, sha256: a.sha256 ? `${a.sha256.slice(0, 12)}…` : "", scale: a.default_scale, tiers: (a.tiers || []).join(" ")}));
    table("adapters-table", view, {actions: (a) => slm.el("button", {type: "button", class: "danger", onclick: () => deleteAdapter(a.name)}, "Delete")});
  }

  async function deleteAdapter(name) {
    const reply = await slm.request("DELETE", `/admin/adapters/${encodeURIComponent(name)}`, {key: key()});
    if (!reply.ok) return state("adapters-state", ...explain(reply, "DELETE /admin/adapters/{name}"));
    loadAdapters();
  }

  $("adapter-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = Object.fromEntries(new FormData(event.target));
    const reply = await slm.request("POST", "/admin/adapters", {key: key(), body});
    if (!reply.ok) return state("adapters-state", ...explain(reply, "POST /admin/adapters"));
    event.target.reset();
    loadAdapters();
  });

  // --- request log ---------------------------------------------------------------------------
  const SHOWN_REQUESTS = 20;
  const lower = (value, prefix) => {
    const name = String(value || "").replace(prefix, "").toLowerCase();
    return name === "unspecified" ? "" : name;
  };

  // How a request was served: "router (intent) → specialist" when a manifest routed it. The
  // hops before the last are router hops; one that chose no intent fell back.
  function route(entry) {
    const hops = Array.isArray(entry.hops) ? entry.hops : [];
    if (entry.cache_hit) return "result cache";
    if (!hops.length) return "direct";
    return hops.map((h, i) => i < hops.length - 1 ? `${h.model} (${h.intent || "fallback"})` : h.model).join(" → ");
  }

  // One request of the ledger as the log shows it: no prompt text (the ledger holds none).
  function requestRow(record) {
    const e = record.entry || {};
    return {
      time: e.time ? new Date(e.time).toLocaleTimeString() : "",
      model: e.model,
      route: route(e),
      tier: lower(e.tier, "TIER_"),
      "TTFT ms": e.ttft_ms === undefined ? "" : Math.round(e.ttft_ms),
      finish: e.status_code ? `error (gRPC ${e.status_code})` : lower(e.finish_reason, "FINISH_REASON_"),
      tokens: `${e.prompt_tokens ?? 0} → ${e.completion_tokens ?? 0}`,
      tenant: e.tenant,
    };
  }

  async function loadRequests() {
    const reply = await slm.request("GET", `/admin/ledger/records?order=newest_first&page_size=${SHOWN_REQUESTS}`, {key: key()});
    if (!reply.ok) {
      table("requests-table", []);
      return state("requests-state", ...explain(reply, "/admin/ledger/records"));
    }
    const shown = rows(reply.body, "records").slice(0, SHOWN_REQUESTS).map(requestRow);
    state("requests-state", shown.length ? `${shown.length} newest request(s), newest first; updated ${new Date().toLocaleTimeString()}` : "No requests yet");
    table("requests-table", shown, {limit: 10});
  }

  // --- ledger --------------------------------------------------------------------------------
  const SHOWN_RECORDS = 20;

  // One ledger record as a flat row: what was served, how, and its place in the chain.
  function ledgerRow(record) {
    const e = record.entry;
    if (!e) return record;
    const masked = Object.entries(e.entity_counts || {}).map(([k, v]) => `${k}×${v}`).join(" ");
    return {
      sequence: record.sequence,
      time: e.time ? new Date(e.time).toLocaleString() : "",
      tenant: e.tenant,
      model: e.model,
      tier: String(e.tier || "").replace("TIER_", "").toLowerCase(),
      finish: String(e.finish_reason || "").replace("FINISH_REASON_", "").toLowerCase(),
      tokens: `${e.prompt_tokens ?? 0} → ${e.completion_tokens ?? 0}`,
      "TTFT ms": e.ttft_ms === undefined ? "" : Math.round(e.ttft_ms),
      masked,
      hash: record.hash ? `${record.hash.slice(0, 12)}…` : "",
    };
  }

  async function loadLedger() {
    const chain = await slm.request("GET", "/admin/ledger/verify", {key: key()});
    if (chain.ok) {
      const b = chain.body || {};
      const count = b.records_checked ?? b.records ?? b.count;
      const detail = count === undefined ? "" : ` (${count} records checked)`;
      if (b.intact === false) {
        const brk = b.first_break || {};
        state("chain-state", `Chain BROKEN at record ${brk.sequence ?? "?"}: ${brk.reason || ""} ${brk.detail || ""}`, "bad");
      } else {
        state("chain-state", `Chain intact${detail}`, "good");
      }
    } else {
      state("chain-state", ...explain(chain, "/admin/ledger/verify"));
    }
    // The chain's tail, as the ledger reads it newest first: one page of the newest records,
    // however many there are (a page of the oldest would show a stale tail).
    const records = await slm.request("GET", `/admin/ledger/records?order=newest_first&page_size=${SHOWN_RECORDS}`, {key: key()});
    if (!records.ok) {
      table("ledger-table", []);
      return state("ledger-state", ...explain(records, "/admin/ledger/records"));
    }
    const rowsShown = rows(records.body, "records", "entries").slice(0, SHOWN_RECORDS).map(ledgerRow);
    state("ledger-state", rowsShown.length ? `${rowsShown.length} most recent record(s), newest first` : "No records yet");
    table("ledger-table", rowsShown, {limit: 10});
  }

  // --- metrics -------------------------------------------------------------------------------
  let previous = null;
  async function loadMetrics() {
    // The edge does not publish /metrics; the gateway shows its own to admins.
    const [metrics, ready] = await Promise.all([
      slm.request("GET", "/admin/metrics", {key: key()}),
      slm.request("GET", "/readyz"),
    ]);
    if (!metrics.ok || typeof metrics.body !== "string") {
      $("metrics").replaceChildren();
      return state("metrics-state", ...explain(metrics, "/admin/metrics"));
    }
    const s = slm.parseMetrics(metrics.body);
    const now = performance.now();
    const requests = slm.sum(s, "slm_gateway_requests_total");
    const generated = slm.sum(s, "slm_gateway_completion_tokens_total");
    const ttftSum = slm.sum(s, "slm_gateway_time_to_first_token_seconds_sum");
    const ttftCount = slm.sum(s, "slm_gateway_time_to_first_token_seconds_count");
    const errors = slm.sum(s, "slm_gateway_requests_total", (l) => Number(l.status) >= 500);
    let rate = "–";
    if (previous) {
      const seconds = (now - previous.at) / 1000;
      if (seconds > 0) rate = ((generated - previous.generated) / seconds).toFixed(1);
    }
    previous = {at: now, generated};
    const tiles = [
      ["Doorman", ready.ok ? "ready" : "not ready"],
      ["HTTP requests", requests],
      ["server errors", errors],
      ["prompt tokens", slm.sum(s, "slm_gateway_prompt_tokens_total")],
      ["generated tokens", generated],
      ["tokens/s now", rate],
      ["mean TTFT", ttftCount ? `${((ttftSum / ttftCount) * 1000).toFixed(0)} ms` : "–"],
    ];
    $("metrics").replaceChildren(...tiles.map(([name, value]) => slm.el("div", {class: "metric"},
      slm.el("div", {class: "value"}, value), slm.el("div", {class: "name"}, name))));
    state("metrics-state", `updated ${new Date().toLocaleTimeString()}`);
  }

  // The chain walk (verify) reads every record: only on load and when the key changes. Models,
  // the request log and metrics are live.
  function refresh() { loadModels(); loadAdapters(); loadLedger(); loadRequests(); }

  $("keyform").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("slm.admin_key", key());
    refresh();
  });
  loadAdapters();
  loadLedger();
  every(2000, loadModels);
  every(2000, loadRequests);
  every(2000, loadMetrics);
})();
