// Stepgate run timeline: a small single-page app over the admin API (/v1/runs).
//
// Views are chosen by the URL hash:  #/runs?status=&route=&since=&until=   the list
//                                    #/runs/{id}                           one run
// Every piece of data reaches the DOM through textContent or setAttribute on elements built
// here; nothing is parsed as HTML, so a step output cannot become markup.
"use strict";

(() => {
  const STATES = ["queued", "running", "retrying", "sleeping", "waiting", "completed", "failed", "cancelled"];
  const ENDED = new Set(["completed", "failed", "cancelled"]);
  const TOKEN_KEY = "stepgate.adminToken";
  const PAGE_SIZE = 50;
  const REFRESH_MS = 1000;
  const PREVIEW_CHARS = 600;
  const PREVIEW_LINES = 14;

  const view = document.getElementById("view");
  const notice = document.getElementById("notice");
  const tokenForm = document.getElementById("token-form");
  const tokenInput = document.getElementById("token-input");
  const tokenToggle = document.getElementById("token-toggle");

  // Bumped on every navigation: answers that arrive for an older view are dropped, and its
  // refresh timer is cleared.
  let generation = 0;
  let timer = null;
  let listHash = "#/runs";
  const expanded = new Set(); // "runId/stepId" whose output is shown in full

  // ---- DOM helpers ---------------------------------------------------------------------------

  function h(tag, props, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") el.className = value;
      else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else el.setAttribute(key, value === true ? "" : String(value));
    }
    add(el, children);
    return el;
  }

  function add(el, children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  // Bars are placed with the CSSOM, which the page's Content-Security-Policy allows (it forbids
  // only inline style attributes and <style> elements).
  function place(el, left, width) {
    el.style.left = left + "%";
    if (width !== undefined) el.style.width = width + "%";
    return el;
  }

  function showNotice(message, kind) {
    notice.textContent = message;
    notice.className = "notice " + (kind || "error");
    notice.hidden = false;
  }

  function clearNotice() {
    notice.hidden = true;
    notice.textContent = "";
  }

  // ---- formatting ----------------------------------------------------------------------------

  const pad = (n, width = 2) => String(n).padStart(width, "0");

  function ms(value) {
    if (value === null || value === undefined || Number.isNaN(value)) return "–";
    const v = Math.max(0, value);
    if (v < 10) return Number(v.toFixed(1)) + " ms";
    if (v < 1000) return Math.round(v) + " ms";
    if (v < 60_000) return (v / 1000).toFixed(v < 10_000 ? 2 : 1) + " s";
    if (v < 3_600_000) return Math.floor(v / 60_000) + " m " + pad(Math.floor(v / 1000) % 60) + " s";
    if (v < 86_400_000) return Math.floor(v / 3_600_000) + " h " + pad(Math.floor(v / 60_000) % 60) + " m";
    return Math.floor(v / 86_400_000) + " d " + pad(Math.floor(v / 3_600_000) % 24) + " h";
  }

  const parse = (text) => (text ? Date.parse(text) : null);

  function when(text, withMillis) {
    if (!text) return "–";
    const d = new Date(text);
    if (Number.isNaN(d.getTime())) return text;
    const day = `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
    const time = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
    return `${day} ${time}` + (withMillis ? "." + pad(d.getMilliseconds(), 3) : "");
  }

  function timeCell(text, withMillis) {
    return h("time", { datetime: text || null, title: text || null }, when(text, withMillis));
  }

  function badge(status) {
    return h("span", { class: "badge s-" + status }, status);
  }

  function shortId(id) {
    return id.length > 14 ? id.slice(0, 12) + "…" : id;
  }

  function json(value) {
    try {
      return JSON.stringify(value, null, 2);
    } catch {
      return String(value);
    }
  }

  // ---- admin API -----------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status;
    }
  }

  async function api(path) {
    const headers = { Accept: "application/json" };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = "Bearer " + token;
    let resp;
    try {
      resp = await fetch(path, { headers, cache: "no-store", credentials: "same-origin" });
    } catch (err) {
      throw new ApiError(0, "the gateway did not answer (" + err.message + ")");
    }
    if (!resp.ok) {
      let detail = resp.status + " " + resp.statusText;
      try {
        const body = await resp.json();
        detail = body.detail || body.title || detail;
      } catch {
        // not problem+json: keep the status line
      }
      throw new ApiError(resp.status, detail);
    }
    return resp.json();
  }

  function apiFailed(err) {
    if (err instanceof ApiError && err.status === 401) {
      const had = Boolean(sessionStorage.getItem(TOKEN_KEY));
      showTokenForm(true);
      showNotice(had ? "The gateway refused this admin token. Paste the right one above."
                     : "This gateway needs its admin token. Paste it above.");
      return;
    }
    showNotice(err.message || String(err));
  }

  // ---- admin token ---------------------------------------------------------------------------

  function showTokenForm(focus) {
    tokenForm.hidden = false;
    if (focus) tokenInput.focus();
  }

  function syncTokenButton() {
    const set = Boolean(sessionStorage.getItem(TOKEN_KEY));
    tokenToggle.textContent = set ? "Admin token ✓" : "Admin token";
    tokenToggle.setAttribute("aria-pressed", set ? "true" : "false");
  }

  tokenToggle.addEventListener("click", () => {
    tokenForm.hidden = !tokenForm.hidden;
    if (!tokenForm.hidden) tokenInput.focus();
  });

  tokenForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const token = tokenInput.value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    tokenInput.value = "";
    tokenForm.hidden = true;
    syncTokenButton();
    clearNotice();
    render();
  });

  document.getElementById("token-clear").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    tokenInput.value = "";
    syncTokenButton();
    render();
  });

  // ---- routing -------------------------------------------------------------------------------

  function route() {
    const fallback = new URLSearchParams(location.search).get("run");
    const raw = location.hash.replace(/^#/, "") || (fallback ? "/runs/" + fallback : "/runs");
    const cut = raw.indexOf("?");
    const path = cut < 0 ? raw : raw.slice(0, cut);
    const query = new URLSearchParams(cut < 0 ? "" : raw.slice(cut + 1));
    const match = /^\/runs\/([^/?]+)$/.exec(path);
    if (match) {
      let id;
      try {
        id = decodeURIComponent(match[1]);
      } catch {
        id = match[1];
      }
      return { name: "run", id };
    }
    return { name: "list", query };
  }

  function render() {
    generation += 1;
    clearTimeout(timer);
    timer = null;
    const where = route();
    if (where.name === "run") {
      showRun(where.id, generation);
    } else {
      listHash = location.hash || "#/runs";
      showList(where.query, generation);
    }
  }

  // ---- list view -----------------------------------------------------------------------------

  // datetime-local inputs hold local wall time without a zone; the API wants an instant.
  function instant(local) {
    const t = Date.parse(local);
    return Number.isNaN(t) ? local : new Date(t).toISOString();
  }

  function filterForm(query) {
    const field = (label, control) => h("label", { class: "field" }, h("span", {}, label), control);
    const status = h("select", { name: "status" },
      h("option", { value: "" }, "any"),
      STATES.map((s) => h("option", { value: s, selected: query.get("status") === s }, s)));
    const routeInput = h("input", { name: "route", type: "text", placeholder: "any",
                                    value: query.get("route") || "", spellcheck: "false" });
    const since = h("input", { name: "since", type: "datetime-local", step: "1",
                               value: query.get("since") || "" });
    const until = h("input", { name: "until", type: "datetime-local", step: "1",
                               value: query.get("until") || "" });
    const form = h("form", { class: "filters", id: "filters" },
      field("Status", status), field("Route", routeInput),
      field("Created since", since), field("until", until),
      h("div", { class: "actions" },
        h("button", { type: "submit" }, "Apply"),
        h("a", { href: "#/runs", class: "quiet button" }, "Clear"),
        h("button", { type: "button", class: "quiet", onclick: () => render() }, "Refresh")));
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const next = new URLSearchParams();
      for (const [key, value] of new FormData(form)) if (value) next.set(key, String(value));
      const hash = "#/runs" + (next.toString() ? "?" + next : "");
      if (location.hash === hash) render();
      else location.hash = hash;
    });
    return form;
  }

  function runRow(run) {
    const created = parse(run.created_at);
    const updated = parse(run.updated_at);
    const live = !ENDED.has(run.status);
    const href = "#/runs/" + encodeURIComponent(run.id);
    return h("tr", { class: "run-row", "data-run-id": run.id },
      h("td", { class: "mono" }, h("a", { href }, run.id)),
      h("td", {}, run.route),
      h("td", {}, badge(run.status)),
      h("td", { class: "num" }, run.attempt),
      h("td", {}, timeCell(run.created_at)),
      h("td", { class: "num" }, live ? h("span", { class: "muted" }, ms(Date.now() - created) + " so far")
                                     : ms(updated - created)));
  }

  async function showList(query, gen) {
    document.title = "Runs · Stepgate";
    // `limit` is not in the form, but a hand-written #/runs?limit=N is honoured.
    const limit = /^\d+$/.test(query.get("limit") || "") ? query.get("limit") : String(PAGE_SIZE);
    const params = new URLSearchParams({ limit });
    for (const key of ["status", "route"]) if (query.get(key)) params.set(key, query.get(key));
    for (const key of ["since", "until"]) if (query.get(key)) params.set(key, instant(query.get(key)));

    const body = h("tbody");
    const table = h("table", { class: "runs", id: "runs" },
      h("thead", {}, h("tr", {},
        h("th", {}, "Run"), h("th", {}, "Route"), h("th", {}, "Status"),
        h("th", { class: "num" }, "Attempt"), h("th", {}, "Created"),
        h("th", { class: "num" }, "Duration"))),
      body);
    const more = h("button", { type: "button", id: "more", hidden: true }, "More");
    const summary = h("p", { class: "muted count" });
    view.replaceChildren(h("h1", {}, "Runs"), filterForm(query), table, h("div", { class: "pager" }, summary, more));

    let shown = 0;
    let cursor = null;
    const load = async () => {
      more.disabled = true;
      const page = new URLSearchParams(params);
      if (cursor) page.set("cursor", cursor);
      let data;
      try {
        data = await api("/v1/runs?" + page);
      } catch (err) {
        if (gen === generation) apiFailed(err);
        more.disabled = false;
        return;
      }
      if (gen !== generation) return;
      clearNotice();
      add(body, data.runs.map(runRow));
      shown += data.runs.length;
      cursor = data.next_cursor;
      more.hidden = !cursor;
      more.disabled = false;
      summary.textContent = shown === 0 ? "No runs match." : `${shown} run${shown === 1 ? "" : "s"}` + (cursor ? " shown" : "");
    };
    more.addEventListener("click", load);
    await load();
  }

  // ---- run view ------------------------------------------------------------------------------

  function attemptClass(attempt) {
    if (attempt.live) return "live";
    if (attempt.outcome === "suspended") return "parked";
    if (attempt.outcome === "response" && attempt.status >= 200 && attempt.status < 400) return "ok";
    return "bad";
  }

  function stepClass(step) {
    if (step.status === "completed") return "ok";
    if (step.status === "failed") return "bad";
    return "parked";
  }

  // Tick spacing: 1, 2 or 5 times a power of ten, so that about six ticks fit.
  function tickStep(span) {
    const raw = span / 6;
    const base = 10 ** Math.floor(Math.log10(raw));
    for (const m of [1, 2, 5, 10]) if (base * m >= raw) return base * m;
    return base * 10;
  }

  // The attempts table holds only finished attempts; the one in flight is drawn from the run.
  function attemptsOf(run, now) {
    const list = run.attempts.map((a) => ({ ...a, live: false }));
    const recorded = new Set(list.map((a) => a.n));
    if (run.status === "running" && !recorded.has(run.attempt)) {
      list.push({ n: run.attempt, started_at: run.updated_at, ended_at: null, outcome: "running",
                  status: null, error: null, live: true, duration_ms: now - parse(run.updated_at) });
    }
    return list;
  }

  function timeline(run, attempts, now) {
    const t0 = parse(run.created_at);
    const marks = [now];
    for (const a of attempts) marks.push(parse(a.started_at), parse(a.ended_at));
    for (const s of run.steps) marks.push(parse(s.created_at), parse(s.updated_at));
    if (run.status === "retrying" && run.due_at) marks.push(parse(run.due_at));
    const t1 = Math.max(t0 + 1, ...marks.filter((t) => t !== null && !Number.isNaN(t)));
    const span = t1 - t0;
    const pct = (t) => Math.min(100, Math.max(0, ((t - t0) / span) * 100));

    const rows = [];
    const bar = (cls, start, end, tooltip) =>
      place(h("div", { class: "tl-bar " + cls, title: tooltip }), pct(start), Math.max(0, pct(end) - pct(start)));
    const row = (cls, name, meta, barEl) =>
      h("div", { class: "tl-row " + cls },
        h("div", { class: "tl-label" }, h("div", { class: "tl-name", title: name }, name), h("div", { class: "tl-meta" }, meta)),
        h("div", { class: "tl-track" }, barEl));

    const runEnd = parse(run.ended_at) ?? now;
    rows.push(row("tl-run", "run", [run.status, " · ", ms(runEnd - t0)],
      bar("s-" + run.status + (ENDED.has(run.status) ? "" : " live"), t0, runEnd,
          `run ${run.status}, ${ms(runEnd - t0)}`)));

    for (const a of attempts) {
      const start = parse(a.started_at);
      const end = a.live ? now : parse(a.ended_at) ?? now;
      const what = a.live ? "in progress" : a.outcome + (a.status ? " " + a.status : "");
      rows.push(row("tl-attempt", "attempt " + a.n, [what, " · ", ms(end - start)],
        bar(attemptClass(a), start, end,
            `attempt ${a.n}: ${what}, ${ms(end - start)}` + (a.error ? ` (${a.error})` : ""))));
    }

    for (const s of run.steps) {
      const start = parse(s.created_at);
      const end = parse(s.updated_at);
      const tries = s.attempts > 1 ? ` · ${s.attempts} attempts` : "";
      const status = s.final ? "failed for good" : s.status;
      rows.push(row("tl-step", s.id, [s.kind, " · ", status, tries, " · ", ms(end - start)],
        bar(stepClass(s) + (s.attempts > 1 ? " retried" : ""), start, end,
            `step ${s.id} (${s.kind}) ${status}, ${s.attempts} attempt(s), ${ms(end - start)}`)));
    }

    const step = tickStep(span);
    const ticks = [];
    const grid = [];
    for (let t = 0; t <= span + 1e-9; t += step) {
      ticks.push(place(h("span", { class: "tl-tick" }, t === 0 ? "0" : "+" + ms(t)), pct(t0 + t)));
      grid.push(place(h("div", { class: "tl-grid" }), pct(t0 + t)));
    }
    if (run.status === "retrying" && run.due_at) {
      grid.push(place(h("div", { class: "tl-due", title: "next attempt due " + when(run.due_at, true) }), pct(parse(run.due_at))));
    }

    return h("section", { class: "timeline", id: "timeline", "aria-label": "Timeline" },
      h("div", { class: "tl-head" }, h("div", { class: "tl-label" }), h("div", { class: "tl-axis" }, ticks)),
      h("div", { class: "tl-body" }, h("div", { class: "tl-grid-layer" }, grid), rows),
      h("ul", { class: "legend" },
        [["ok", "succeeded"], ["bad", "failed"], ["parked", "suspended, sleeping or waiting"], ["live", "in progress"]]
          .map(([cls, label]) => h("li", {}, h("span", { class: "swatch " + cls }), label))));
  }

  function errorText(error) {
    if (error === null || error === undefined) return null;
    if (typeof error === "string") return error;
    if (typeof error === "object" && typeof error.message === "string") {
      const kind = typeof error.type === "string" && error.type ? error.type + ": " : "";
      return kind + error.message + (error.retriable === false ? " (not retriable)" : "");
    }
    return json(error);
  }

  function outputBlock(runId, step) {
    const text = json(step.output);
    const key = runId + "/" + step.id;
    const lines = text.split("\n");
    const long = text.length > PREVIEW_CHARS || lines.length > PREVIEW_LINES;
    const open = expanded.has(key);
    let shown = text;
    if (long && !open) {
      shown = lines.slice(0, PREVIEW_LINES).join("\n");
      if (shown.length > PREVIEW_CHARS) shown = shown.slice(0, PREVIEW_CHARS);
      shown += "\n…";
    }
    const pre = h("pre", { class: "output" }, shown);
    if (!long) return pre;
    const wrap = h("div", { class: "output-wrap" }, pre);
    add(wrap, [h("button", {
      type: "button", class: "quiet small",
      onclick: () => {
        if (expanded.has(key)) expanded.delete(key);
        else expanded.add(key);
        wrap.replaceWith(outputBlock(runId, step));
      },
    }, open ? "Show less" : `Show all (${step.output_size.toLocaleString()} bytes)`)]);
    return wrap;
  }

  function stepDetail(run, step) {
    const parts = [];
    const err = errorText(step.error);
    if (err) parts.push(h("div", { class: "error" }, err));
    if (step.final) {
      parts.push(h("div", { class: "final-note" }, "Failed for good: its attempts are spent, so the " +
        "handler is told (StepFailed, StepFailedError) instead of running it again; the steps after it " +
        "are its answer to that, such as a compensation."));
    }
    if (step.kind === "event" && step.output && typeof step.output === "object") {
      parts.push(h("div", { class: "muted" }, "sent event ", h("code", {}, String(step.output.name)),
        " id ", h("code", {}, String(step.output.id))));
    }
    if (step.kind === "sleep" && step.wake_at) parts.push(h("div", { class: "muted" }, "wakes at ", timeCell(step.wake_at, true)));
    if (step.kind === "wait" && step.event) {
      parts.push(h("div", { class: "muted" }, "waits for ", h("code", {}, step.event),
        step.match ? [" matching ", h("code", {}, JSON.stringify(step.match))] : null,
        step.wake_at ? [" until ", timeCell(step.wake_at, true)] : null));
    }
    if (step.kind === "signal" && step.url) {
      parts.push(h("div", { class: "muted signal-url" }, step.status === "completed" ? "was signalled at " : "waits for a POST to ",
        h("code", {}, step.url), step.status !== "completed" && step.wake_at ? [" until ", timeCell(step.wake_at, true)] : null));
    }
    if (step.kind === "invoke" && step.run_id) {
      parts.push(h("div", { class: "muted child-link" }, "child run ",
        h("a", { class: "mono", href: "#/runs/" + encodeURIComponent(step.run_id) }, step.run_id)));
    }
    if (step.status === "completed") parts.push(outputBlock(run.id, step));
    return parts;
  }

  // step.invoke: a child run links to its parent, a parent to the runs its steps started.
  function lineage(run, item) {
    const link = (id) => h("a", { class: "mono", href: "#/runs/" + encodeURIComponent(id) }, id);
    const out = [];
    if (run.parent_id) out.push(item("Parent", h("span", { id: "parent-run" }, link(run.parent_id), " (step ", h("code", {}, run.parent_step), ")")));
    if (run.children && run.children.length > 0) {
      out.push(item("Children", h("span", { id: "child-runs" }, run.children.map((c, i) => [i ? ", " : "",
        link(c.id), " ", c.status ? badge(c.status) : null]))));
    }
    return out;
  }

  function runHeader(run, now) {
    const end = parse(run.ended_at) ?? now;
    const live = !ENDED.has(run.status);
    const item = (label, ...value) => [h("dt", {}, label), h("dd", {}, value)];
    return [
      h("p", { class: "crumbs" }, h("a", { href: listHash }, "← All runs")),
      h("h1", { class: "run-title" }, "Run ", h("span", { class: "mono", id: "run-id" }, run.id), " ", badge(run.status),
        live ? h("span", { class: "live-dot", title: "refreshing every second" }, "live") : null),
      h("dl", { class: "facts" },
        item("Route", run.route),
        item("Request", h("code", {}, run.method + " " + run.target)),
        item("Attempt", String(run.attempt), run.failures ? ` (${run.failures} failed)` : ""),
        item("Created", timeCell(run.created_at, true)),
        item(run.ended_at ? "Ended" : "Updated", timeCell(run.ended_at || run.updated_at, true)),
        item("Duration", ms(end - parse(run.created_at)), live ? " so far" : ""),
        run.response_status ? item("Response", String(run.response_status)) : null,
        run.due_at ? item(run.status === "retrying" ? "Next attempt" : "Wakes by", timeCell(run.due_at, true)) : null,
        item("Trace id", run.trace_id ? h("code", {}, run.trace_id) : "–"),
        ...lineage(run, item),
        run.error ? item("Error", h("span", { class: "error" }, run.error)) : null),
    ];
  }

  function attemptsTable(run, attempts, now) {
    const t0 = parse(run.created_at);
    return h("table", { class: "attempts", id: "attempts" },
      h("thead", {}, h("tr", {},
        h("th", { class: "num" }, "#"), h("th", {}, "Started"), h("th", { class: "num" }, "Duration"),
        h("th", {}, "Outcome"), h("th", { class: "num" }, "HTTP"), h("th", {}, "Error"))),
      h("tbody", {}, attempts.map((a) => {
        const start = parse(a.started_at);
        const end = a.live ? now : parse(a.ended_at);
        return h("tr", { class: "attempt-row", "data-attempt": a.n },
          h("td", { class: "num" }, a.n),
          h("td", {}, "+" + ms(start - t0)),
          h("td", { class: "num" }, end === null ? "–" : ms(end - start)),
          h("td", {}, h("span", { class: "pill " + attemptClass(a) }, a.live ? "in progress" : a.outcome)),
          h("td", { class: "num" }, a.status ?? "–"),
          h("td", { class: "error" }, a.error || ""));
      })));
  }

  function stepsTable(run) {
    const t0 = parse(run.created_at);
    if (run.steps.length === 0) return h("p", { class: "muted" }, "No steps recorded.");
    return h("table", { class: "steps", id: "steps" },
      h("thead", {}, h("tr", {},
        h("th", { class: "num" }, "#"), h("th", {}, "Step"), h("th", {}, "Kind"), h("th", {}, "Status"),
        h("th", { class: "num" }, "Attempts"), h("th", {}, "Started"), h("th", { class: "num" }, "Duration"),
        h("th", {}, "Output / error"))),
      h("tbody", {}, run.steps.map((s) => h("tr", { class: "step-row", "data-step-id": s.id },
        h("td", { class: "num" }, s.seq ?? "–"),
        h("td", { class: "mono step-id" }, s.id),
        h("td", {}, s.kind),
        h("td", {}, badge(s.status), s.final ? [" ", h("span", { class: "badge s-final" }, "final")] : null),
        h("td", { class: "num" }, s.policy ? `${s.attempts} of ${s.policy.attempts}` : s.attempts),
        h("td", {}, "+" + ms(parse(s.created_at) - t0)),
        h("td", { class: "num" }, ms(s.duration_ms)),
        h("td", { class: "detail" }, stepDetail(run, s))))));
  }

  function drawRun(run) {
    // The gateway's clock stamps the records; never draw "now" before its latest stamp.
    const stamps = [run.updated_at, run.ended_at, ...run.steps.map((s) => s.updated_at)].map(parse).filter((t) => t !== null);
    const now = ENDED.has(run.status) ? Math.max(...stamps) : Math.max(Date.now(), ...stamps);
    const attempts = attemptsOf(run, now);
    view.replaceChildren(
      ...runHeader(run, now),
      h("h2", {}, "Timeline"), timeline(run, attempts, now),
      h("h2", {}, "Attempts"), attemptsTable(run, attempts, now),
      h("h2", {}, "Steps"), stepsTable(run));
    view.setAttribute("data-run-status", run.status);
  }

  async function showRun(id, gen) {
    document.title = "Run " + shortId(id) + " · Stepgate";
    view.replaceChildren(h("p", { class: "crumbs" }, h("a", { href: listHash }, "← All runs")),
                         h("p", { class: "muted" }, "Loading run…"));
    const refresh = async () => {
      if (gen !== generation) return;
      if (document.hidden && view.hasAttribute("data-run-status")) {
        timer = setTimeout(refresh, REFRESH_MS); // keep polling cheap in a background tab
        return;
      }
      let run;
      try {
        run = await api("/v1/runs/" + encodeURIComponent(id));
      } catch (err) {
        if (gen !== generation) return;
        apiFailed(err);
        if (err instanceof ApiError && (err.status === 404 || err.status === 401)) {
          if (err.status === 404) view.replaceChildren(h("p", { class: "crumbs" }, h("a", { href: listHash }, "← All runs")),
                                                       h("p", {}, "No run with id ", h("code", {}, id), "."));
          return;
        }
        timer = setTimeout(refresh, REFRESH_MS * 2);
        return;
      }
      if (gen !== generation) return;
      clearNotice();
      drawRun(run);
      if (!ENDED.has(run.status)) timer = setTimeout(refresh, REFRESH_MS);
    };
    view.removeAttribute("data-run-status");
    await refresh();
  }

  window.addEventListener("hashchange", render);
  syncTokenButton();
  render();
})();
