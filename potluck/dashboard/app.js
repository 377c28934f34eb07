// potluck dashboard: polls this peer's /api/status and /api/credits and draws them.
// Plain DOM, no framework, no CDN. Every value from the network goes in through textContent.
"use strict";

const REFRESH_MS = 2000;
const key = new URLSearchParams(location.search).get("key");
const headers = key ? { Authorization: "Bearer " + key } : {};
let lastOk = 0;

const $ = (id) => document.getElementById(id);
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
const short = (id) => (id ? "…" + id.slice(-8) : "–");
const fmt = (x, d = 1) => (x === null || x === undefined ? "–" : Number(x).toLocaleString(undefined, { maximumFractionDigits: d, minimumFractionDigits: d }));
const blocks = (a, b) => (b - a === 1 ? `block ${a}` : `blocks ${a}–${b - 1}`);

// Cluster labels are often a peer id (the cluster's anchor): show them short, like peer ids.
const label = (l) => (l && l.length > 16 ? short(l) : l || "–");
function clusterLevels(clusters) {
  return Object.keys(clusters || {}).filter((l) => clusters[l]).sort((a, b) => Number(a) - Number(b));
}
function smallestCluster(clusters) {
  const levels = clusterLevels(clusters);
  return levels.length ? label(clusters[levels[0]]) : "–";
}

async function get(path) {
  const r = await fetch(path, { headers, cache: "no-store" });
  if (!r.ok) {
    let msg = r.status + " " + r.statusText;
    try { msg = (await r.json()).error.message; } catch (e) { /* keep the status line */ }
    throw new Error(path + ": " + msg);
  }
  return r.json();
}

function drawMe(s) {
  $("me-id").textContent = s.peer_id;
  $("me-id").title = (s.addrs || []).join("\n");
  $("me-region").textContent = s.region || "–";
  const cl = (s.dht && s.dht.clusters) || {};
  const levels = clusterLevels(cl);
  $("me-clusters").textContent = levels.length ? levels.map((l) => `L${l} ${label(cl[l])}`).join(" · ") : "–";
  $("me-clusters").title = levels.map((l) => `level ${l}: ${cl[l]}`).join("\n");
  const srv = s.server;
  $("me-serves").textContent = srv && srv.start !== null && srv.start !== undefined
    ? `${blocks(srv.start, srv.end)} · ${srv.sessions} session${srv.sessions === 1 ? "" : "s"}` : "no blocks (client only)";
  $("me-api").textContent = s.api || "–";
}

function drawRoute(g) {
  const box = $("route");
  box.replaceChildren();
  if (g && g.fallback) {
    const by = g.fallback === "local" ? "this peer's own copy of the model (--fallback local)"
      : `the fallback (${g.fallback_model})`;
    box.classList.remove("muted");
    box.textContent = g.swarm_pieces
      ? `the swarm wrote ${g.swarm_pieces} pieces (${g.swarm_error}), then ${by} the rest`
      : `answered by ${by}, not the swarm` + (g.swarm_error ? `: ${g.swarm_error}` : "");
    $("route-stats").textContent = `${g.tokens} tokens · ` + (g.swarm_pieces ? "only the swarm's part cost credits" : "no credits");
    return;
  }
  if (!g || !g.route || !g.route.length) {
    box.textContent = "no request yet";
    $("route-stats").textContent = "";
    return;
  }
  box.classList.remove("muted");
  g.route.forEach((hop, i) => {
    if (i) box.append(el("span", "arrow", "→"));
    const h = el("span", "hop");
    h.append(el("span", "blocks", blocks(hop.start, hop.end)), document.createTextNode(" " + short(hop.peer_id)));
    h.title = hop.peer_id;
    box.append(h);
  });
  const parts = [`${g.tokens} tokens`];
  if (g.tokens_per_s) parts.push(`${fmt(g.tokens_per_s)} tok/s`);
  if (g.ttft_s !== null && g.ttft_s !== undefined) parts.push(`first token ${fmt(g.ttft_s, 2)} s`);
  if (g.credits_spent !== undefined) parts.push(`${fmt(g.credits_spent)} credits`);
  if (g.recoveries) parts.push(`${g.recoveries} re-route${g.recoveries === 1 ? "" : "s"}`);
  $("route-stats").textContent = parts.join(" · ");
}

function drawModels(models, lastRoute) {
  const list = $("model-list");
  list.replaceChildren();
  if (!models || !models.length) {
    list.textContent = "no model known yet";
    list.classList.add("muted");
    return;
  }
  list.classList.remove("muted");
  const used = new Set((lastRoute || []).map((h) => `${h.peer_id}:${h.start}:${h.end}`));
  const usedPeers = new Set((lastRoute || []).map((h) => h.peer_id));
  for (const m of models) {
    const box = el("div", "model");
    box.dataset.model = m.name;
    const head = el("div", "model-head");
    head.append(el("span", "name", m.name), el("span", "muted mono", m.model_id.slice(0, 16)));
    const cov = m.coverage;
    if (!cov) {
      head.append(el("span", "muted", "coverage unknown (the DHT did not answer)"));
      box.append(head);
      list.append(box);
      continue;
    }
    const summary = el("span", "coverage-summary", `${cov.covered_blocks} / ${cov.num_blocks} blocks covered`);
    head.append(summary);
    if (cov.complete && cov.throughput.length) {
      const tps = Math.min(...cov.throughput);
      const at = cov.throughput.indexOf(tps);
      head.append(el("span", "muted", `slowest block ${at}: ${fmt(tps, 0)} tok/s`));
    }
    if (cov.missing.length) {
      head.append(el("span", "error", "missing: " + cov.missing.map(([a, b]) => blocks(a, b)).join(", ")));
    }
    box.append(head);
    const bar = el("div", "bar");
    bar.setAttribute("role", "img");
    bar.setAttribute("aria-label", `${m.name}: ${cov.covered_blocks} of ${cov.num_blocks} blocks covered`);
    cov.replicas.forEach((r, i) => {
      const c = el("div", "cell r" + Math.min(r, 3));
      c.title = `block ${i}: ${r} replica${r === 1 ? "" : "s"}, ${fmt(cov.throughput[i])} tok/s`;
      c.dataset.replicas = r;
      bar.append(c);
    });
    box.append(bar);
    const axis = el("div", "axis");
    axis.append(el("span", "", "block 0"), el("span", "", `block ${cov.num_blocks - 1}`));
    box.append(axis);
    const spans = el("div", "spans");
    for (const s of cov.servers) {
      const row = el("div", "span-row");
      row.dataset.peer = s.peer_id;
      const who = el("span", "who", short(s.peer_id));
      who.title = s.peer_id;
      const track = el("div", "track");
      const seg = el("div", "seg");
      const inRoute = [...used].some((k) => k.startsWith(s.peer_id + ":")) || usedPeers.has(s.peer_id);
      if (inRoute) seg.classList.add("used");
      seg.style.left = (100 * s.start) / cov.num_blocks + "%";
      seg.style.width = (100 * (s.end - s.start)) / cov.num_blocks + "%";
      seg.title = `${blocks(s.start, s.end)} · ${fmt(s.decode_tps)} tok/s per block · cache ${s.cache_tokens} tokens`;
      track.append(seg);
      row.append(who, track, el("span", "tps", `${blocks(s.start, s.end)} · ${fmt(s.decode_tps, 0)} tok/s`));
      spans.append(row);
    }
    box.append(spans);
    list.append(box);
  }
}

function drawPeers(s) {
  const servers = new Map();
  for (const m of s.models || []) {
    for (const srv of (m.coverage && m.coverage.servers) || []) servers.set(srv.peer_id, srv);
  }
  const role = (id) => {
    const srv = servers.get(id);
    return srv ? `serves ${blocks(srv.start, srv.end)}` : "peer";
  };
  const tbody = $("peers").querySelector("tbody");
  tbody.replaceChildren();
  const me = el("tr", "me");
  const srvMe = servers.get(s.peer_id);
  me.append(el("td", "mono", short(s.peer_id)), el("td", "", (srvMe ? role(s.peer_id) : "client") + " (this peer)"),
    el("td", "", s.region || "–"), el("td", "", smallestCluster(s.dht && s.dht.clusters)), el("td", "num", "–"),
    el("td", "alive", "alive"));
  me.firstChild.title = s.peer_id;
  me.dataset.peer = s.peer_id;
  tbody.append(me);
  const peers = [...(s.peers || [])].sort((a, b) => (b.alive - a.alive) || ((a.rtt_ms ?? 1e9) - (b.rtt_ms ?? 1e9)));
  for (const p of peers) {
    const tr = el("tr");
    tr.dataset.peer = p.peer_id;
    const srv = servers.get(p.peer_id);
    const id = el("td", "mono", short(p.peer_id));
    id.title = p.peer_id + (p.addr ? "\n" + p.addr : "");
    tr.append(id, el("td", "", role(p.peer_id)), el("td", "", p.region || "–"),
      el("td", "", smallestCluster(srv && srv.clusters)),
      el("td", "num", p.rtt_ms === null || p.rtt_ms === undefined ? "–" : fmt(p.rtt_ms, 1) + " ms"),
      el("td", p.alive ? "alive" : "dead", p.alive ? "alive" : "dead"));
    tbody.append(tr);
  }
  $("peer-count").textContent = `(${peers.filter((p) => p.alive).length} alive of ${peers.length} known)`;
}

function drawCredits(c, myId) {
  $("cr-balance").textContent = fmt(c.balance);
  $("cr-unit").textContent = (c.unit || "").split(" (")[0];
  $("cr-unit").title = c.unit || "";
  $("cr-earned").textContent = fmt(c.earned);
  $("cr-spent").textContent = fmt(c.spent);
  $("cr-granted").textContent = fmt(c.granted);
  $("total").textContent = `(total ${fmt(c.total)})`;
  const tbody = $("balances").querySelector("tbody");
  tbody.replaceChildren();
  for (const b of c.peers || []) {
    const tr = el("tr", b.peer_id === myId ? "me" : "");
    const id = el("td", "mono", short(b.peer_id) + (b.peer_id === myId ? " (this peer)" : ""));
    id.title = b.peer_id;
    tr.append(id, el("td", "num", fmt(b.balance)), el("td", "num", fmt(b.earned)), el("td", "num", fmt(b.spent)),
      el("td", "num", b.standing == null ? "–" : fmt(b.standing)),
      el("td", b.frozen ? "dead" : "", b.frozen ? "frozen" : "ok"));
    tbody.append(tr);
  }
}

async function refresh() {
  try {
    const [s, c] = await Promise.all([get("/api/status"), get("/api/credits")]);
    drawMe(s);
    drawRoute(s.last_generation);
    drawModels(s.models, s.last_generation && s.last_generation.route);
    drawPeers(s);
    drawCredits(c, s.peer_id);
    $("error").hidden = true;
    lastOk = Date.now();
    document.body.dataset.loaded = "1";
  } catch (e) {
    $("error").hidden = false;
    $("error").textContent = "cannot reach this peer: " + e.message;
  }
}

function tick() {
  $("updated").textContent = lastOk ? `updated ${Math.round((Date.now() - lastOk) / 1000)} s ago · refreshes every ${REFRESH_MS / 1000} s` : "loading…";
}

async function loop() {
  await refresh();
  setTimeout(loop, REFRESH_MS);
}

loop();
setInterval(tick, 1000);
