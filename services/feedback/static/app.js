// The labellers' page: plain JavaScript, no build step. Every text from the stream is put in the
// page with textContent (never innerHTML); state-changing requests carry the session's CSRF token.
"use strict";

// cards the list shows (newest first); `?shown=N` in the page's address sets it (default 100)
const MAX_SHOWN = Math.max(1, parseInt(new URLSearchParams(location.search).get("shown"), 10) || 100);
const STALE_S = 300;  // a rollout older than this (by the stream's clock) is skipped by the queue
const MAX_QUEUED = 2000;  // the service remembers feedback.recent_rollouts (default 2000)
// held: the list stops turning over (new rollouts wait in `waiting`); queue: unlabelled rollouts, oldest first;
// selectedId: the rollout the labeller selected (click, j/k; null: none). Its card is pinned: while it is
// selected it never leaves the list and is never rebuilt, however many rollouts arrive above it
const state = { csrf: null, cursor: 0, items: [], selectedId: null, compare: null, timers: [],
                held: false, waiting: [], queue: [], labelled: new Set(), newest: 0 };
const $ = (id) => document.getElementById(id);

async function api(method, path, body) {
  const headers = { "Accept": "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && state.csrf) headers["X-CSRF-Token"] = state.csrf;
  const response = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) {
    const detail = data && data.detail ? JSON.stringify(data.detail) : response.statusText;
    const error = new Error(`${response.status}: ${detail}`);
    error.status = response.status;
    throw error;
  }
  return data;
}

function say(text, isError) {
  const el = $("message");
  el.textContent = text;
  el.className = isError ? "error" : "";
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function card(item) {
  const li = el("li", "rollout");
  li.dataset.id = item.rollout_id;
  li.dataset.group = item.group_id;
  li.dataset.seq = String(item.seq);
  let meta = `${item.generator} · policy v${item.policy_version} · reward ${item.reward.toFixed(3)}`;
  if (item.human) meta += ` · H-hat ${item.human.value.toFixed(2)} (v${item.human.model_version})`;
  if (item.selection) meta += ` · chosen among ${item.selection.candidates}${item.selection.by_model ? " by H-hat" : ""}`;
  li.appendChild(el("div", "meta", meta));
  li.appendChild(el("div", "prompt", item.prompt));
  li.appendChild(el("div", "completion", item.completion));
  const actions = el("div", "actions");
  const up = el("button", "rate-up", "+1 good");
  up.type = "button";
  up.addEventListener("click", () => rate(item.rollout_id, 1));
  const down = el("button", "rate-down", "-1 bad");
  down.type = "button";
  down.addEventListener("click", () => rate(item.rollout_id, -1));
  const compare = el("button", "compare", "compare");
  compare.type = "button";
  compare.addEventListener("click", () => openCompare(item));
  actions.append(up, down, compare, el("span", "verdict", ""));
  li.appendChild(actions);
  li.addEventListener("click", () => select(state.items.findIndex((x) => x.rollout_id === item.rollout_id)));
  return li;
}

// the newest MAX_SHOWN of `items` (newest first), always with the selected one, in their order
function shown(items) {
  const pinned = items.some((x) => x.rollout_id === state.selectedId);
  let others = 0;
  return items.filter((x) => x.rollout_id === state.selectedId || others++ < MAX_SHOWN - (pinned ? 1 : 0));
}

// fresh cards go on top; cards past MAX_SHOWN leave, except the selected one (pinned: a key pressed
// after a poll labels the card the labeller selected, which is still the same element on the page)
function render() {
  const list = $("rollouts");
  const have = new Set(Array.from(list.children, (li) => li.dataset.id));
  const fresh = state.items.filter((item) => !have.has(item.rollout_id));
  for (const item of fresh.reverse()) list.insertBefore(card(item), list.firstChild);
  state.items = shown(state.items);
  const kept = new Set(state.items.map((x) => x.rollout_id));
  for (const li of Array.from(list.children)) if (!kept.has(li.dataset.id)) list.removeChild(li);
  select(selectedIndex());
}

// the position of the selected card in state.items (and on the page), -1 when none is selected
function selectedIndex() {
  return state.items.findIndex((x) => x.rollout_id === state.selectedId);
}

// select the card at `index` (-1: none; the labeller's Esc deselects, which unpins it)
function select(index) {
  state.selectedId = index >= 0 && state.items[index] ? state.items[index].rollout_id : null;
  Array.from($("rollouts").children).forEach((li) => li.classList.toggle("selected", li.dataset.id === state.selectedId));
}

function cardOf(id) {
  return document.querySelector(`#rollouts li[data-id="${CSS.escape(id)}"]`);
}

async function poll() {
  try {
    const data = await api("GET", `/api/rollouts?after=${state.cursor}&limit=50`);
    if (data.rollouts.length) {
      state.cursor = data.cursor;
      for (const item of data.rollouts) {
        state.newest = Math.max(state.newest, item.seen_at);
        state.queue.push(item);
      }
      if (state.queue.length > MAX_QUEUED) state.queue.splice(0, state.queue.length - MAX_QUEUED);
      if (state.held) {
        state.waiting = state.waiting.concat(data.rollouts);
        $("held-count").textContent = `${state.waiting.length} new rollouts waiting`;
      } else {
        state.items = data.rollouts.slice().reverse().concat(state.items);
        render();
      }
      showQueue();
    }
  } catch (e) {
    if (e.status === 401) return showLogin();
    say(`cannot load rollouts (${e.message})`, true);
  }
}

// a line of series[i][key] by policy version in the <svg> `id`; returns the newest point (or undefined)
function drawLine(id, series, key, floor) {
  const svg = $(id);
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  if (!series.length) return undefined;
  const values = series.map((p) => p[key]);
  const lo = floor === undefined ? Math.min(...values) : floor, hi = Math.max(...values);
  const span = hi - lo || 1;
  const points = series.map((p, i) => {
    const x = series.length === 1 ? 240 : (i / (series.length - 1)) * 476 + 2;
    const y = 76 - ((p[key] - lo) / span) * 72;
    return `${x.toFixed(1)},${y.toFixed(1)}`;
  });
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points.join(" "));
  svg.appendChild(line);
  return series[series.length - 1];
}

function drawCharts(status) {
  const reward = drawLine("reward-chart", status.reward_by_version, "reward_mean");
  $("reward-last").textContent = reward
    ? `v${reward.version}: mean reward ${reward.reward_mean.toFixed(3)} (${reward.rollouts} rollouts)` : "";
  const beta = drawLine("beta-chart", status.beta_by_version, "beta", 0);
  $("beta-last").textContent = beta ? `v${beta.version}: beta_t ${beta.beta.toFixed(3)}` : "";
}

async function refreshStatus() {
  try {
    const s = await api("GET", "/api/status");
    $("labels").textContent = String(s.labels.total);
    $("model-version").textContent = String(s.human_model_version);
    $("labels-in-model").textContent = String(s.labels_in_model);
    $("seen").textContent = String(s.rollouts_received);
    $("combination").textContent = s.combination;
    $("influence").textContent = s.influence_active ? "on" : "paused";
    $("beta-t").textContent = s.beta_t.toFixed(3);
    $("beta-version").textContent = String(s.policy_version);
    $("beta-0").textContent = String(s.beta);
    drawCharts(s);
  } catch (e) {
    if (e.status === 401) showLogin();
  }
}

// the oldest rollout still waiting for a label: labelled and stale ones (older than STALE_S by the
// stream's own clock, soon forgotten by the service) leave the queue
function queueHead() {
  while (state.queue.length) {
    const item = state.queue[0];
    if (!state.labelled.has(item.rollout_id) && state.newest - item.seen_at <= STALE_S) return item;
    state.queue.shift();
  }
  return null;
}

function showQueue() {
  const item = queueHead();
  $("queue-card").hidden = !item;
  $("queue-empty").hidden = !!item;
  $("queue-count").textContent = `(${state.queue.length} waiting)`;
  if (!item) return;
  $("queue-card").dataset.id = item.rollout_id;
  $("queue-meta").textContent = `policy v${item.policy_version} · reward ${item.reward.toFixed(3)} · ${item.rollout_id}`;
  $("queue-prompt").textContent = item.prompt;
  $("queue-completion").textContent = item.completion;
}

async function rateQueued(value) {
  const item = queueHead();
  if (!item) return;
  state.labelled.add(item.rollout_id);  // at once: a second key press labels the next one, not this again
  showQueue();
  await rate(item.rollout_id, value);
}

function skipQueued() {
  if (state.queue.length) state.queue.shift();
  showQueue();
}

function setHeld(held) {
  state.held = held;
  $("hold").hidden = held;
  $("resume").hidden = !held;
  $("stream-state").textContent = held ? "held" : "live";
  if (!held && state.waiting.length) {
    state.items = state.waiting.slice().reverse().concat(state.items);
    state.waiting = [];
    render();
  }
  $("held-count").textContent = "";
}

async function rate(id, value) {
  try {
    const label = await api("POST", "/api/ratings", { rollout_id: id, value });
    state.labelled.add(id);
    const li = cardOf(id);
    if (li) {
      li.classList.toggle("rated-up", value > 0);
      li.classList.toggle("rated-down", value < 0);
      li.querySelector(".verdict").textContent = `label #${label.label_id}: ${value > 0 ? "+1" : "-1"}`;
    }
    say(`stored label #${label.label_id}`);
    refreshStatus();
  } catch (e) {
    say(`label not stored (${e.message})`, true);
  }
}

async function openCompare(item) {
  try {
    const group = await api("GET", `/api/groups/${encodeURIComponent(item.group_id)}`);
    const other = group.rollouts.find((r) => r.rollout_id !== item.rollout_id);
    if (!other) return say("no other completion of this prompt has streamed in yet", true);
    state.compare = { left: item, right: other };
    $("compare-prompt").textContent = item.prompt;
    $("left").textContent = item.completion;
    $("right").textContent = other.completion;
    $("compare").hidden = false;
  } catch (e) {
    say(`cannot compare (${e.message})`, true);
  }
}

async function pick(side) {
  const pair = state.compare;
  if (!pair) return;
  const chosen = side === "left" ? pair.left : pair.right;
  const rejected = side === "left" ? pair.right : pair.left;
  try {
    const label = await api("POST", "/api/preferences", { chosen: chosen.rollout_id, rejected: rejected.rollout_id });
    say(`stored label #${label.label_id}: preferred ${side}`);
    closeCompare();
    refreshStatus();
  } catch (e) {
    say(`preference not stored (${e.message})`, true);
  }
}

function closeCompare() {
  state.compare = null;
  $("compare").hidden = true;
}

async function setInfluence(active) {
  try {
    await api("POST", "/api/influence", { active });
    refreshStatus();
  } catch (e) {
    say(`cannot switch the influence (${e.message})`, true);
  }
}

function onKey(event) {
  if (event.target instanceof HTMLInputElement || $("app").hidden) return;
  if (event.repeat) {  // a held key: one label, not one per auto-repeat
    event.preventDefault();
    return;
  }
  const index = selectedIndex();
  const item = state.items[index];
  switch (event.key) {
    case "h": setHeld(!state.held); break;
    case "U": rateQueued(1); break;
    case "D": rateQueued(-1); break;
    case "S": skipQueued(); break;
    case "j": select(Math.min(index + 1, state.items.length - 1)); break;
    case "k": select(Math.max(index - 1, 0)); break;
    case "+": case "=": case "u": if (item) rate(item.rollout_id, 1); break;
    case "-": case "d": if (item) rate(item.rollout_id, -1); break;
    case "c": if (item) openCompare(item); break;
    case "1": pick("left"); break;
    case "2": pick("right"); break;
    case "Escape": if (state.compare) closeCompare(); else select(-1); break;
    default: return;
  }
  event.preventDefault();
}

function showLogin() {
  state.timers.forEach(clearInterval);
  state.timers = [];
  $("app").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("who").textContent = "";
}

function showApp(session) {
  state.csrf = session.csrf_token;
  $("who").textContent = `labeller: ${session.labeller}`;
  $("login").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = false;
  poll();
  refreshStatus();
  state.timers.push(setInterval(poll, 1000), setInterval(refreshStatus, 2000));
}

async function login(event) {
  event.preventDefault();
  $("login-error").textContent = "";
  try {
    showApp(await api("POST", "/api/login", { token: $("token").value }));
    $("token").value = "";
  } catch (e) {
    $("login-error").textContent = `log-in refused (${e.message})`;
  }
}

async function logout() {
  try { await api("POST", "/api/logout"); } catch (e) { /* the session is gone either way */ }
  state.csrf = null;
  showLogin();
}

async function start() {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  $("start").addEventListener("click", () => setInfluence(true));
  $("pause").addEventListener("click", () => setInfluence(false));
  $("pick-left").addEventListener("click", () => pick("left"));
  $("pick-right").addEventListener("click", () => pick("right"));
  $("compare-close").addEventListener("click", closeCompare);
  $("hold").addEventListener("click", () => setHeld(true));
  $("resume").addEventListener("click", () => setHeld(false));
  $("queue-up").addEventListener("click", () => rateQueued(1));
  $("queue-down").addEventListener("click", () => rateQueued(-1));
  $("queue-skip").addEventListener("click", skipQueued);
  document.addEventListener("keydown", onKey);
  try {
    showApp(await api("GET", "/api/session"));
  } catch (e) {
    showLogin();
  }
}

start();
