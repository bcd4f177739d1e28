// Shopfloor Gateway web console: a small vanilla app, no external code, live by SSE.
"use strict";

const main = () => document.getElementById("main");

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    // Through the CSSOM: the page's Content-Security-Policy refuses style attributes.
    else if (k === "style") el.style.cssText = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function when(t) {
  if (t === null || t === undefined) return "–";
  const d = new Date(t * 1000);
  const today = new Date().toDateString() === d.toDateString();
  return today ? d.toLocaleTimeString() : d.toLocaleString();
}

function ago(s) {
  if (s === null || s === undefined) return "–";
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

const num = (v) => (v === null || v === undefined ? "–" : String(v));
// A device's float32 (0.4000000059604645) shown as the device meant it (0.4).
const value = (v) => (typeof v === "number" && !Number.isInteger(v) ? String(Number(v.toPrecision(6))) : num(v));

async function api(path) {
  const r = await fetch(path, { headers: { Accept: "application/json" } });
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

function stateBadge(state) {
  return h("span", { class: `badge s-${state || "unknown"}`, "data-field": "state" }, state || "unknown");
}

function eventText(e) {
  if (!e) return "–";
  const d = e.data || {};
  const bits = [e.type];
  if (d.order_id) bits.push(d.order_id);
  if (d.state) bits.push(d.state);
  if (d.reason) bits.push(d.reason);
  if (d.text) bits.push(d.text);
  return `${bits.join(" · ")} (${when(e.time)})`;
}

// ---------------------------------------------------------------- floor

const floor = { machines: new Map(), filters: { text: "", state: "", conn: "" } };

function machineCard(m) {
  const pct = m.percent === null ? 0 : Math.min(100, m.percent);
  return h("div", { class: "card", id: `m-${m.id}`, "data-machine": m.id },
    h("div", { class: "top" },
      h("a", { class: "id", href: `/machines/${encodeURIComponent(m.id)}` }, m.id),
      stateBadge(m.state)),
    h("div", { class: "small" },
      h("span", { class: `dot ${m.connected ? "on" : "off"}` }),
      h("span", { "data-field": "connection" }, m.connected ? "connected" : "offline"),
      m.alarm ? h("span", { class: "badge s-fault", style: "margin-left:.4rem" }, m.alarm) : null),
    h("div", { class: "counts" },
      h("span", {}, "Order "), h("strong", { "data-field": "order" }, m.order_id || "none"),
      m.at_risk ? h("span", { class: "badge risk", "data-field": "at-risk", style: "margin-left:.4rem" }, "at risk") : null),
    h("div", { class: "counts" },
      "good ", h("strong", { "data-field": "good" }, num(m.good)),
      " · scrap ", h("strong", { "data-field": "scrap" }, num(m.scrap)),
      " · target ", h("strong", { "data-field": "target" }, num(m.target))),
    h("div", { class: "bar", title: m.percent === null ? "" : `${m.percent.toFixed(1)} %` },
      h("div", { style: `width:${pct}%` })),
    h("div", { class: "small" }, "ETA ", when(m.eta), m.queued ? ` · ${m.queued} queued` : ""),
    h("div", { class: "small", "data-field": "last-event" }, eventText(m.last_event)));
}

function visible(m) {
  const f = floor.filters;
  if (f.state && m.state !== f.state) return false;
  if (f.conn === "on" && !m.connected) return false;
  if (f.conn === "off" && m.connected) return false;
  if (f.text) {
    const hay = `${m.id} ${m.area} ${m.line} ${m.order_id || ""}`.toLowerCase();
    if (!hay.includes(f.text.toLowerCase())) return false;
  }
  return true;
}

function drawFloor() {
  const box = document.getElementById("floor");
  if (!box) return;
  const groups = new Map();
  for (const m of floor.machines.values()) {
    if (!visible(m)) continue;
    const key = `${m.area} / ${m.line}`;
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(m);
  }
  const keys = [...groups.keys()].sort();
  box.replaceChildren(...keys.map((k) => h("section", {},
    h("h2", {}, k),
    h("div", { class: "grid" }, groups.get(k).sort((a, b) => a.id.localeCompare(b.id)).map(machineCard)))));
  if (!keys.length) box.append(h("p", {}, "No machine matches the filter."));
}

async function showFloor() {
  const [data, del] = await Promise.all([api("/api/floor"), api("/api/deliveries")]);
  floor.machines = new Map(data.machines.map((m) => [m.id, m]));
  document.getElementById("title").textContent = `${data.gateway_id} · ${data.site}`;
  const states = ["running", "idle", "setup", "stopped", "fault", "maintenance", "offline"];
  const f = floor.filters;
  main().replaceChildren(
    h("h1", {}, `Floor · ${data.machines.length} machines`),
    h("div", { class: "strip", id: "destinations" }, del.deliveries.map((d) =>
      h("a", { href: `/deliveries#d-${d.name}`, "data-destination": d.name },
        h("span", { class: `dot ${d.connected ? "on" : "off"}` }), `${d.name} · backlog ${d.backlog}`))),
    h("div", { class: "filters" },
      h("input", { type: "search", placeholder: "machine, line or order", value: f.text, "aria-label": "filter",
        oninput: (e) => { f.text = e.target.value; drawFloor(); } }),
      h("select", { "aria-label": "state", onchange: (e) => { f.state = e.target.value; drawFloor(); } },
        h("option", { value: "" }, "every state"), states.map((s) => h("option", { value: s, selected: f.state === s }, s))),
      h("select", { "aria-label": "connection", onchange: (e) => { f.conn = e.target.value; drawFloor(); } },
        h("option", { value: "" }, "connected or not"), h("option", { value: "on" }, "connected"),
        h("option", { value: "off" }, "offline"))),
    h("div", { id: "floor" }));
  drawFloor();
}

function floorUpdate(rows) {
  for (const m of rows) {
    floor.machines.set(m.id, m);
    const old = document.getElementById(`m-${m.id}`);
    if (old) {
      if (visible(m)) old.replaceWith(machineCard(m));
      else old.remove();
    }
  }
}

// ---------------------------------------------------------------- machine

function table(head, rows, id) {
  return h("div", { class: "table-wrap" }, h("table", { id },
    h("thead", {}, h("tr", {}, head.map((c) => h("th", {}, c)))),
    h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: head.length, class: "small" }, "none")))));
}

function commandForm(machine, name, fields) {
  const answer = h("div", { class: "answer", "data-answer": name });
  const inputs = {};
  const form = h("form", { class: "cmd", id: `form-${name}` },
    fields.map(([key, label, type]) => h("label", {}, label,
      inputs[key] = h("input", { name: key, type: type || "text", autocomplete: "off" }))),
    h("label", {}, "console token", inputs.token = h("input", { name: "token", type: "password", autocomplete: "off" })),
    h("button", { type: "submit" }, name));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = {};
    for (const [key, , type] of fields) {
      const v = inputs[key].value.trim();
      if (v === "") continue;
      body[key] = type === "number" ? Number(v) : v;
    }
    const headers = { "Content-Type": "application/json" };
    if (inputs.token.value) headers.Authorization = `Bearer ${inputs.token.value}`;
    let text, ok;
    try {
      const r = await fetch(`/api/machines/${encodeURIComponent(machine)}/${name}`,
        { method: "POST", headers, body: JSON.stringify(body) });
      const doc = await r.json();
      ok = r.ok && doc.accepted;
      text = doc.reason || doc.error || `HTTP ${r.status}`;
      text = `${ok ? "accepted" : "refused"} (HTTP ${r.status}): ${text}`;
    } catch (e) { ok = false; text = String(e); }
    answer.className = `answer ${ok ? "yes" : "no"}`;
    answer.textContent = text;
    if (ok) refreshMachine(machine);
  });
  return h("div", {}, form, answer);
}

async function refreshMachine(id) {
  const d = await api(`/api/machines/${encodeURIComponent(id)}`);
  const box = document.getElementById("machine-live");
  if (!box) return;
  const s = d.summary;
  box.replaceChildren(
    h("div", { class: "grid" }, machineCard(s)),
    h("h2", {}, "Signals"),
    table(["signal", "value", "quality", "source time"], d.signals.map((v) =>
      h("tr", { "data-signal": v.signal }, h("td", {}, v.signal), h("td", { class: "num" }, value(v.value)),
        h("td", {}, v.quality), h("td", {}, when(v.source_time)))), "signals"),
    h("h2", {}, "Order queue"),
    table(["order", "customer"], d.queue.map((q) => h("tr", { "data-order": q.order_id },
      h("td", {}, q.order_id), h("td", {}, q.customer || "–"))), "queue"),
    h("h2", {}, "Alarms"),
    h("p", {}, "Active: ", h("strong", {}, s.alarm || "none")),
    table(["time", "event", "code / text"], d.alarms.map((e) => h("tr", {},
      h("td", {}, when(e.time)), h("td", {}, e.type), h("td", {}, `${e.data.code || ""} ${e.data.text || ""}`))), "alarms"),
    h("h2", {}, "Connection history"),
    table(["time", "link", "cause"], d.connections.map((c) => h("tr", {},
      h("td", {}, when(c.time)), h("td", {}, c.connected ? "up" : "down"), h("td", {}, c.reason))), "connections"),
    h("h2", {}, "Recent events"),
    table(["#", "time", "event"], d.events.map((e) => h("tr", {},
      h("td", { class: "num" }, e.sequence), h("td", {}, when(e.time)), h("td", {}, eventText(e)))), "events"),
    h("h2", {}, "Orders"),
    ordersTable(d.orders));
}

async function showMachine(id) {
  main().replaceChildren(
    h("h1", {}, `Machine ${id}`),
    h("div", { id: "machine-live" }, "Loading…"),
    h("h2", {}, "Assign an order"),
    commandForm(id, "assign-order", [["order_id", "order id"], ["target", "target", "number"],
      ["customer", "customer"], ["command_id", "command id"]]),
    h("h2", {}, "Cancel an order"),
    commandForm(id, "cancel-order", [["order_id", "order id"], ["command_id", "command id"]]));
  await refreshMachine(id);
}

// ---------------------------------------------------------------- orders, deliveries, config

// Progress updates come every few percent: one line says how many, the latest shows the count.
function orderEvents(events) {
  const progress = events.filter((e) => e.type === "order.progress");
  const lines = events.filter((e) => e.type !== "order.progress" || e === progress[progress.length - 1]);
  return lines.map((e) => h("div", {}, eventText(e),
    e.type === "order.progress" && progress.length > 1 ? ` · last of ${progress.length} progress updates` : ""));
}

function orderCounts(events) {
  for (let i = events.length - 1; i >= 0; i--) {
    const d = events[i].data || {};
    if (d.good !== undefined) return `${d.good}${d.target ? ` / ${d.target}` : ""}`;
  }
  return "–";
}

function ordersTable(orders) {
  const sorted = [...orders].sort((a, b) => (a.status === "running" ? 0 : 1) - (b.status === "running" ? 0 : 1));
  return table(["machine", "order", "status", "good / target", "events"], sorted.map((o) => h("tr", { "data-order": o.order_id },
    h("td", {}, h("a", { href: `/machines/${encodeURIComponent(o.machine)}` }, o.machine)),
    h("td", {}, o.order_id), h("td", {}, o.status), h("td", { class: "num" }, orderCounts(o.events)),
    h("td", { class: "small" }, orderEvents(o.events)))), "orders");
}

async function showOrders() {
  const d = await api("/api/orders");
  main().replaceChildren(h("h1", {}, "Orders"), ordersTable(d.orders));
}

async function showDeliveries() {
  const d = await api("/api/deliveries");
  main().replaceChildren(h("h1", {}, "Deliveries"),
    table(["name", "kind", "link", "backlog", "oldest unacknowledged", "sent", "acknowledged", "dropped", "last error"],
      d.deliveries.map((x) => h("tr", { id: `d-${x.name}`, "data-destination": x.name },
        h("td", {}, h("strong", {}, x.name)), h("td", {}, x.kind),
        h("td", {}, h("span", { class: `dot ${x.connected ? "on" : "off"}` }), x.connected ? "connected" : "down"),
        h("td", { class: "num" }, x.limit ? `${x.backlog} / ${x.limit}` : x.backlog),
        h("td", { class: "num" }, ago(x.oldest_unacknowledged_s)),
        h("td", { class: "num" }, x.sent), h("td", { class: "num" }, x.acknowledged), h("td", { class: "num" }, x.dropped),
        h("td", { class: "small" }, x.last_error || "–"))), "deliveries"));
  if (location.hash) document.getElementById(location.hash.slice(1))?.scrollIntoView();
}

async function showConfig() {
  const d = await api("/api/config");
  const r = d.last_reload;
  main().replaceChildren(h("h1", {}, "Config"),
    h("p", {}, d.writable ? "Orders may be assigned here with the console token."
      : "Read-only: no console token is configured."),
    h("h2", {}, "Last reload"),
    h("p", { id: "reload" }, r ? `${when(r.time)}: ${r.applied ? "applied" : "refused"}` : "not reloaded since the start"),
    h("ul", { id: "reload-problems" }, r ? r.problems.map((p) => h("li", {}, p)) : []),
    h("h2", {}, "Running config (secrets masked)"),
    // Lists of names (signals, routing rules) on one line each: the page stays readable.
    h("pre", { id: "config" }, JSON.stringify(d.config, null, 2)
      .replace(/\[\s+([^\[\]{}]*?)\s+\]/g, (_, items) => `[${items.split(/,\s+/).join(", ")}]`)));
}

// ---------------------------------------------------------------- routing and live updates

function route() {
  const p = location.pathname;
  let page = "floor";
  let show = showFloor;
  let onLive = floorUpdate;
  const m = p.match(/^\/machines\/([^/]+)$/);
  if (m) {
    const id = decodeURIComponent(m[1]);
    page = null; show = () => showMachine(id);
    onLive = (rows) => { if (rows.some((r) => r.id === id)) refreshMachine(id); };
  } else if (p === "/orders") { page = "orders"; show = showOrders; onLive = () => showOrders(); }
  else if (p === "/deliveries") { page = "deliveries"; show = showDeliveries; onLive = () => showDeliveries(); }
  else if (p === "/config") { page = "config"; show = showConfig; onLive = () => {}; }
  for (const a of document.querySelectorAll("header nav a")) a.classList.toggle("active", a.dataset.page === page);
  return { show, onLive };
}

function live(onLive) {
  const badge = document.getElementById("live");
  const es = new EventSource("/api/stream");
  es.addEventListener("hello", () => { badge.className = "live on"; });
  es.addEventListener("machines", (e) => { onLive(JSON.parse(e.data)); });
  es.onerror = () => { badge.className = "live off"; };
}

window.addEventListener("DOMContentLoaded", async () => {
  const { show, onLive } = route();
  try { await show(); } catch (e) { main().replaceChildren(h("p", { class: "answer no" }, String(e))); }
  live(onLive);
});
