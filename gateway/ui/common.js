// Small helpers shared by the chat and admin pages: no framework, no build step.
"use strict";

const slm = {
  // Create an element: slm.el("td", {class: "x"}, "text", child).
  el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === false || value === null || value === undefined) continue;
      if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  },

  // The message of an OpenAI-shaped error body, or the HTTP status.
  errorText(status, body) {
    if (body && body.error && body.error.message) return body.error.message;
    return `HTTP ${status}`;
  },

  // fetch + JSON; resolves {ok, status, body} and never throws for HTTP errors.
  async request(method, path, {key, body} = {}) {
    const headers = {};
    if (key) headers.authorization = `Bearer ${key}`;
    if (body !== undefined) headers["content-type"] = "application/json";
    let response;
    try {
      response = await fetch(path, {
        method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (error) {
      return {ok: false, status: 0, body: {error: {message: `unreachable: ${error.message}`}}};
    }
    const text = await response.text();
    let parsed = text;
    try { parsed = text ? JSON.parse(text) : null; } catch (_) { /* plain text body */ }
    return {ok: response.ok, status: response.status, body: parsed};
  },

  // The ws:// or wss:// URL of a path on this origin.
  wsUrl(path) {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return `${scheme}//${location.host}${path}`;
  },

  // Prometheus text format -> [{name, labels, value}], enough for the admin page's figures.
  parseMetrics(text) {
    const samples = [];
    const line = /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/;
    const label = /(\w+)="((?:[^"\\]|\\.)*)"/g;
    for (const row of text.split("\n")) {
      if (!row || row.startsWith("#")) continue;
      const m = line.exec(row);
      if (!m) continue;
      const labels = {};
      for (const l of (m[2] || "").matchAll(label)) labels[l[1]] = l[2];
      samples.push({name: m[1], labels, value: Number(m[3])});
    }
    return samples;
  },

  sum(samples, name, filter) {
    return samples
      .filter((s) => s.name === name && (!filter || filter(s.labels)))
      .reduce((total, s) => total + s.value, 0);
  },
};
