// clb web console. Plain ES2020, no dependencies; loaded with `defer` from index.html.
//
// The page's Content-Security-Policy forbids inline scripts, inline event handlers and style
// attributes, so everything is wired here with addEventListener, looks come from classes in
// app.css, and server data only ever reaches the DOM through textContent (never innerHTML).
'use strict';

(() => {
  const PAGE_SIZE = 50;
  const STATUS_MS = 2000;
  const LISTENERS_MS = 2000;
  const SERIES_MS = 5000;
  const PERSIST_MAX = 3600;
  const PERSIST_DEFAULT = 600;
  const DRAIN_DEFAULT = 300;
  // Line colours, assigned to backends per listener in order of first appearance.
  const PALETTE = ['#2563eb', '#16a34a', '#dc2626', '#d97706', '#7c3aed',
    '#0891b2', '#db2777', '#65a30d', '#ea580c', '#475569'];
  const FONT = '-apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif';
  // Shape checks only (the daemon validates): IPv4 or IPv6, a prefix, an address and port.
  const CLIENT_RE = /^(\d{1,3}(\.\d{1,3}){3}(\/\d{1,2})?|[0-9a-fA-F:.]*:[0-9a-fA-F:.]*(\/\d{1,3})?)$/;
  const ADDR_RE = /^(\d{1,3}(\.\d{1,3}){3}|\[[0-9a-fA-F:.]*:[0-9a-fA-F:.]*\]):\d{1,5}$/;

  const $ = (id) => document.getElementById(id);

  const state = {
    csrf: null,
    // Bumped whenever polling must stop (logout, expired session); loops of an older
    // generation end at their next tick.
    gen: 0,
    status: null,
    listeners: [],
    listenersSeq: 0,     // latest /api/listeners request issued
    listenersApplied: 0, // latest one whose answer was rendered
    series: null,
    selected: null,      // name of the selected listener
    listenerRows: new Map(), // listener name -> <tr>
    backendRows: new Map(),  // backend addr -> <tr> (for state.backendsOf)
    backendsOf: null,
    colors: new Map(),       // "listener|addr" -> colour
    colorCount: new Map(),   // listener -> colours handed out
    pollErrors: {},          // source -> message, shown in the banner
    explorers: {},
  };

  // ------------------------------------------------------------------ helpers

  /** Creates an element; `props.text` sets textContent, `class` the class name. */
  function el(tag, props, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v == null || v === false) continue;
      if (k === 'class') e.className = v;
      else if (k === 'text') e.textContent = v;
      else e.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children) if (c != null) e.append(c); // strings become text nodes
    return e;
  }

  function setText(idOrEl, text) {
    const e = typeof idOrEl === 'string' ? $(idOrEl) : idOrEl;
    const t = text == null ? '' : String(text);
    if (e.textContent !== t) e.textContent = t;
  }

  const pill = (text, kind, title) => el('span', { class: `pill ${kind || ''}`, text, title });
  const fmtNum = (n) => (typeof n === 'number' ? n.toLocaleString('en-US') : '-');

  function fmtDuration(secs) {
    secs = Math.max(0, Math.floor(secs || 0));
    const d = Math.floor(secs / 86400), h = Math.floor(secs % 86400 / 3600);
    const m = Math.floor(secs % 3600 / 60), s = secs % 60;
    if (d) return `${d}d ${h}h`;
    if (h) return `${h}h ${m}m`;
    if (m) return `${m}m ${s}s`;
    return `${s} s`;
  }

  function fmtAgo(unix) {
    if (!unix) return '-';
    const d = Math.max(0, Math.floor(Date.now() / 1000 - unix));
    if (d < 10) return 'just now';
    if (d < 60) return `${d} s ago`;
    if (d < 3600) return `${Math.floor(d / 60)} min ago`;
    if (d < 86400) return `${Math.floor(d / 3600)} h ago`;
    return `${Math.floor(d / 86400)} d ago`;
  }

  function fmtBytes(n) {
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return `${i ? n.toFixed(1) : n} ${units[i]}`;
  }

  /** Short axis label: 1200 -> "1.2k", 0.25 -> "0.25". */
  function fmtCompact(v) {
    const a = Math.abs(v);
    if (a >= 1e9) return `${+(v / 1e9).toFixed(1)}G`;
    if (a >= 1e6) return `${+(v / 1e6).toFixed(1)}M`;
    if (a >= 1e3) return `${+(v / 1e3).toFixed(1)}k`;
    return String(+v.toFixed(2));
  }

  const fmtClock = (unix, secs) => new Date(unix * 1000).toLocaleTimeString('en-GB',
    secs ? { hour: '2-digit', minute: '2-digit', second: '2-digit' } : { hour: '2-digit', minute: '2-digit' });

  /** The colour of a backend's line, the same in every chart and in the backends table. */
  function colorFor(listener, addr) {
    const key = `${listener}|${addr}`;
    let c = state.colors.get(key);
    if (!c) {
      const n = state.colorCount.get(listener) || 0;
      c = PALETTE[n % PALETTE.length];
      state.colorCount.set(listener, n + 1);
      state.colors.set(key, c);
    }
    return c;
  }

  // ---------------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(message, status, expired) {
      super(message);
      this.status = status;
      this.expired = !!expired;
    }
  }

  /**
   * Calls the API. Resolves to the parsed JSON body (null for an empty one), rejects with an
   * ApiError carrying the server's `error` text. A 401 means the session is gone: unless
   * `opts.auth === false` (login and the initial session check) it brings back the login screen.
   */
  async function api(method, path, body, opts = {}) {
    const headers = { Accept: 'application/json' };
    const init = { method, headers, credentials: 'same-origin', cache: 'no-store' };
    if (method !== 'GET' && state.csrf) headers['X-CSRF-Token'] = state.csrf;
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let res;
    try {
      res = await fetch(path, init);
    } catch (e) {
      throw new ApiError(`Cannot reach the server (${e.message})`, 0);
    }
    if (res.status === 401 && opts.auth !== false) {
      sessionExpired();
      throw new ApiError('Your session has expired. Sign in again.', 401, true);
    }
    const text = res.status === 204 ? '' : await res.text();
    let data = null;
    if (text) {
      try { data = JSON.parse(text); } catch (_) { data = null; }
    }
    if (!res.ok) {
      const msg = data && typeof data.error === 'string' ? data.error
        : `${res.status} ${res.statusText || 'error'}`.trim();
      throw new ApiError(msg, res.status);
    }
    return data;
  }

  // ------------------------------------------------------------ login / views

  function showLogin(message) {
    state.csrf = null;
    state.gen++; // stops the polling loops
    const dlg = $('modify-dialog');
    if (dlg.open) dlg.close();
    $('boot').hidden = true;
    $('console').hidden = true;
    $('login').hidden = false;
    setText('login-error', message || '');
    $('login-submit').disabled = false;
    $('login-token').focus();
  }

  function sessionExpired() {
    if (!state.csrf) return; // already showing the login screen
    showLogin('Your session has expired. Sign in again.');
  }

  function showConsole() {
    $('boot').hidden = true;
    $('login').hidden = true;
    $('console').hidden = false;
    state.pollErrors = {};
    renderBanner();
    startPolling();
    // The explorers are loaded once when shown, then only on demand.
    loadExplorer('sessions');
    loadExplorer('conns');
  }

  async function onLogin(e) {
    e.preventDefault(); // always: CSP form-action 'none' forbids real submission
    const token = $('login-token').value.trim();
    if (!token) { setText('login-error', 'Paste your token.'); return; }
    // A pasted sign-in link (`clb console link`) signs in with its one-time code.
    const m = token.match(/#sign-in=([0-9a-f]+)$/);
    $('login-submit').disabled = true;
    setText('login-error', '');
    try {
      const body = m ? { code: m[1] } : { token };
      const r = await api('POST', '/api/login', body, { auth: false });
      state.csrf = r && r.csrf;
      $('login-token').value = '';
      showConsole();
    } catch (err) {
      setText('login-error', err.message);
    } finally {
      $('login-submit').disabled = false;
    }
  }

  async function onLogout() {
    $('logout').disabled = true;
    try {
      await api('POST', '/api/logout');
      showLogin('');
    } catch (err) {
      if (!err.expired) {
        setPollError('logout', `Sign-out failed: ${err.message}`);
        setTimeout(() => setPollError('logout', null), 8000);
      }
    } finally {
      $('logout').disabled = false;
    }
  }

  // ------------------------------------------------------------------ polling

  function startPolling() {
    const gen = ++state.gen;
    const loop = (source, fn, ms) => {
      const tick = async () => {
        if (gen !== state.gen) return;
        try {
          await fn();
          setPollError(source, null);
        } catch (err) {
          if (!err.expired) setPollError(source, err.message);
        }
        if (gen === state.gen) setTimeout(tick, ms);
      };
      tick();
    };
    loop('status', refreshStatus, STATUS_MS);
    loop('listeners', refreshListeners, LISTENERS_MS);
    loop('series', refreshSeries, SERIES_MS);
  }

  function setPollError(source, message) {
    if (message) state.pollErrors[source] = message;
    else delete state.pollErrors[source];
    renderBanner();
  }

  function renderBanner() {
    const msgs = [...new Set(Object.values(state.pollErrors))];
    setText('banner', msgs.join(' · '));
  }

  async function refreshStatus() {
    state.status = await api('GET', '/api/status');
    renderStatus();
  }

  async function refreshListeners() {
    // Answers may arrive out of order (a poll racing a refresh after a change): keep the newest.
    const seq = ++state.listenersSeq;
    const data = await api('GET', '/api/listeners');
    if (seq < state.listenersApplied) return;
    state.listenersApplied = seq;
    state.listeners = Array.isArray(data) ? data : [];
    const selectionGone = !state.listeners.some((l) => l.name === state.selected);
    if (selectionGone) state.selected = state.listeners.length ? state.listeners[0].name : null;
    renderListeners();
    renderBackends();
    renderSummary();
    updateListenerSelect('sessions-listener');
    updateListenerSelect('conns-listener');
    if (selectionGone) drawCharts();
  }

  async function refreshSeries() {
    state.series = await api('GET', '/api/series');
    drawCharts();
  }

  /** Refreshes after a change, reporting nothing (the polling loop reports failures). */
  function refreshSoon() {
    refreshListeners().catch(() => {});
  }

  // ------------------------------------------------------------------- status

  function renderStatus() {
    const s = state.status || {};
    const line = $('status-line');
    const items = [el('span', { class: 'version', text: `v${s.version || '?'}` })];
    const dp = String(s.datapath || 'unknown');
    items.push(pill(`datapath ${dp}`, dp === 'attached' ? 'ok' : 'bad'));
    const f = s.flood || {};
    if (f.active) {
      items.push(pill(`SYN flood defence active · ${f.remaining_secs} s left`, 'bad',
        `entered ${f.entered} times since start`));
    } else {
      items.push(pill('no flood', 'ok', `flood defence entered ${f.entered || 0} times since start`));
    }
    const bad = (s.loops || []).filter((l) => l.state !== 'running');
    if (bad.length) items.push(pill(`${bad.length} loop${bad.length > 1 ? 's' : ''} not running`, 'warn'));
    items.push(el('span', { class: 'muted', text: `up ${fmtDuration(s.uptime_secs)}` }));
    line.replaceChildren(...items);

    setText('tile-uptime', fmtDuration(s.uptime_secs));
    setText('system-ifaces', (s.ifaces || []).length ? `Interfaces: ${s.ifaces.join(', ')}` : 'No interfaces');

    $('tables-body').replaceChildren(...(s.tables || []).map((t) => {
      const pct = t.capacity ? Math.min(100, (t.live / t.capacity) * 100) : 0;
      const bar = el('div', { class: 'bar' }, el('div', { class: `bar-fill ${pct > 90 ? 'bad' : pct > 70 ? 'warn' : ''}` }));
      bar.firstChild.style.width = `${pct.toFixed(1)}%`; // CSSOM, allowed by the CSP
      return el('tr', null,
        el('td', { class: 'mono', text: t.name }),
        el('td', { title: `${pct.toFixed(1)}%` }, bar),
        el('td', { class: 'num', text: `${fmtNum(t.live)} / ${fmtNum(t.capacity)}` }),
        el('td', { class: 'num', text: fmtBytes(t.memory_bytes || 0) }));
    }));

    $('loops-body').replaceChildren(...(s.loops || []).map((l) => el('tr', null,
      el('td', { class: 'mono', text: l.name }),
      el('td', null, pill(l.state, l.state === 'running' ? 'ok' : l.state === 'restarting' ? 'bad' : 'muted')),
      el('td', { class: 'num', text: fmtNum(l.restarts) }),
      el('td', { class: 'small wrap', text: l.last_error || '-' }))));

    // The BGP block's shape is not fixed here: show its scalar fields, summarise the rest.
    const bgp = s.bgp;
    $('bgp').hidden = !bgp || typeof bgp !== 'object';
    if (bgp && typeof bgp === 'object') {
      const rows = [];
      for (const [k, v] of Object.entries(bgp)) {
        let text;
        if (v == null) text = '-';
        else if (Array.isArray(v)) text = v.every((x) => typeof x !== 'object') ? v.join(', ') || '-' : `${v.length} entries`;
        else if (typeof v === 'object') text = JSON.stringify(v);
        else text = String(v);
        rows.push(el('dt', { text: k.replace(/_/g, ' ') }), el('dd', { text }));
      }
      $('bgp-list').replaceChildren(...rows);
    }
  }

  function renderSummary() {
    let backends = 0, healthy = 0, conns = 0, sessions = 0;
    for (const l of state.listeners) {
      for (const b of l.backends || []) {
        backends++;
        if (b.health === 'healthy') healthy++;
        conns += (b.live && b.live.conns) || 0;
        sessions += (b.live && b.live.sessions) || 0;
      }
    }
    setText('tile-listeners', fmtNum(state.listeners.length));
    setText('tile-backends', `${healthy} / ${backends}`);
    setText('tile-conns', fmtNum(conns));
    setText('tile-sessions', fmtNum(sessions));
  }

  // ---------------------------------------------------------------- listeners

  const LISTENER_COLS = ['name', 'proto', 'vip', 'sched', 'persist', 'timeout', 'health', 'actions'];

  function createListenerRow(name) {
    const tr = el('tr', { 'data-listener': name, tabindex: 0 });
    for (const col of LISTENER_COLS) tr.append(el('td', { 'data-col': col }));
    tr.lastChild.append(el('button', { type: 'button', class: 'btn small modify', 'data-listener': name, text: 'Modify' }));
    return tr;
  }

  function healthCheckText(hc) {
    if (!hc || hc.kind === 'none') return 'no health check';
    if (hc.kind === 'http') return `http ${hc.path || '/'} → ${hc.status || '2xx'} every ${hc.interval} s`;
    return `${hc.kind} check every ${hc.interval} s`;
  }

  function updateListenerRow(tr, l) {
    const cell = (col) => tr.querySelector(`td[data-col="${col}"]`);
    const failed = l.serving && l.serving !== 'serving';
    // replaceChildren would turn a null into the text "null": pass only elements.
    cell('name').replaceChildren(...[el('span', { class: 'strong', text: l.name }),
      failed ? el('div', { class: 'sub bad-text', text: l.serving }) : null].filter(Boolean));
    cell('proto').replaceChildren(el('span', { class: `tag ${l.proto}`, text: l.proto }));
    setText(cell('vip'), l.vip);
    cell('vip').className = 'mono';
    setText(cell('sched'), l.sched ? (l.forward ? `${l.sched} / ${l.forward}` : l.sched) : '-');

    const p = cell('persist');
    setText(p, l.persist > 0 ? `${l.persist} s` : 'off');
    p.className = l.persist > 0 ? '' : 'muted';
    p.title = l.persist > 0
      ? ((l.proto === 'http' || l.proto === 'https') ? `cookie ${l.cookie_name || ''}` : `per /${l.persist_mask == null ? (l.vip.startsWith('[') ? 128 : 32) : l.persist_mask} client prefix`)
      : '';

    let timeout = '-';
    if (l.idle_timeout != null) timeout = `idle ${l.idle_timeout} s`;
    else if (l.keepalive_timeout != null) timeout = `keep-alive ${l.keepalive_timeout} s`;
    setText(cell('timeout'), timeout);

    const bs = l.backends || [];
    const healthy = bs.filter((b) => b.health === 'healthy').length;
    const h = [];
    if (!bs.length) h.push(pill('no backends', 'muted'));
    else h.push(pill(`${healthy}/${bs.length} healthy`, healthy === bs.length ? 'ok' : healthy ? 'warn' : 'bad'));
    if (l.all_backends_unhealthy) {
      h.push(el('span', { class: 'pill bad all-unhealthy', text: '⚠ all backends unhealthy',
        title: 'Every backend that could take traffic is unhealthy, so all of them get it.' }));
    }
    h.push(el('div', { class: 'sub', text: healthCheckText(l.health_check) }));
    cell('health').replaceChildren(...h);

    tr.classList.toggle('selected', l.name === state.selected);
    tr.setAttribute('aria-selected', l.name === state.selected ? 'true' : 'false');
  }

  /** Updates the listeners table in place, so elements held by tests or focus stay valid. */
  function renderListeners() {
    const tbody = $('listeners-body');
    const seen = new Set();
    let prev = null;
    for (const l of state.listeners) {
      seen.add(l.name);
      let tr = state.listenerRows.get(l.name);
      if (!tr) {
        tr = createListenerRow(l.name);
        state.listenerRows.set(l.name, tr);
      }
      updateListenerRow(tr, l);
      const want = prev ? prev.nextSibling : tbody.firstChild; // keep the server's order
      if (tr !== want) tbody.insertBefore(tr, want);
      prev = tr;
    }
    for (const [name, tr] of state.listenerRows) {
      if (!seen.has(name)) { tr.remove(); state.listenerRows.delete(name); }
    }
    $('listeners-empty').hidden = state.listeners.length > 0;
  }

  function selectListener(name) {
    if (state.selected === name) return;
    state.selected = name;
    for (const [n, tr] of state.listenerRows) {
      tr.classList.toggle('selected', n === name);
      tr.setAttribute('aria-selected', n === name ? 'true' : 'false');
    }
    setText('backends-error', '');
    renderBackends();
    drawCharts();
  }

  const selectedListener = () => state.listeners.find((l) => l.name === state.selected) || null;

  function onListenersClick(e) {
    const modify = e.target.closest('button.modify');
    if (modify) { openModify(modify.dataset.listener); return; }
    if (e.target.closest('button, input, select, a')) return;
    const tr = e.target.closest('tr[data-listener]');
    if (tr) selectListener(tr.dataset.listener);
  }

  function onListenersKey(e) {
    const tr = e.target.closest('tr[data-listener]');
    if (tr && e.target === tr && (e.key === 'Enter' || e.key === ' ')) {
      e.preventDefault();
      selectListener(tr.dataset.listener);
    }
  }

  /** Keeps a listener filter <select> in step with the listeners, keeping its choice. */
  function updateListenerSelect(id) {
    const sel = $(id);
    const names = state.listeners.map((l) => l.name);
    const have = [...sel.options].slice(1).map((o) => o.value);
    if (have.join('\n') === names.join('\n')) return;
    const value = sel.value;
    sel.replaceChildren(el('option', { value: '', text: 'All listeners' }),
      ...names.map((n) => el('option', { value: n, text: n })));
    if (value && !names.includes(value)) sel.append(el('option', { value, text: `${value} (gone)` }));
    sel.value = value;
  }

  // ------------------------------------------------------------ modify dialog

  function persistMin(proto) { return (proto === 'http' || proto === 'https') ? 30 : 1; }

  function openModify(name) {
    const l = state.listeners.find((x) => x.name === name);
    const dlg = $('modify-dialog');
    if (!l || dlg.open) return;
    dlg.dataset.listener = l.name;
    dlg.dataset.proto = l.proto;
    setText('modify-title', `Modify listener ${l.name}`);
    setText('modify-sub', `${l.proto} · ${l.vip}`);
    const min = persistMin(l.proto);
    const on = l.persist > 0;
    $('persist-enabled').checked = on;
    const dur = $('persist-duration');
    dur.min = String(min);
    dur.max = String(PERSIST_MAX);
    dur.value = on ? String(l.persist) : '';
    dur.disabled = !on;
    setText('persist-hint', `Allowed: ${min}-${PERSIST_MAX} seconds` +
      ((l.proto === 'http' || l.proto === 'https') ? ' (HTTP: by cookie).' : ' (TCP/UDP: by client address).'));
    setText('modify-error', '');
    $('modify-ok').disabled = false;
    dlg.showModal();
    (on ? dur : $('persist-enabled')).focus();
  }

  function onPersistToggle() {
    const dur = $('persist-duration');
    const on = $('persist-enabled').checked;
    dur.disabled = !on;
    if (on && dur.value.trim() === '') dur.value = String(PERSIST_DEFAULT);
    if (on) dur.focus();
    setText('modify-error', '');
  }

  async function onModifySubmit(e) {
    e.preventDefault();
    const dlg = $('modify-dialog');
    const name = dlg.dataset.listener;
    let persist = 0;
    if ($('persist-enabled').checked) {
      const raw = $('persist-duration').value.trim();
      const min = persistMin(dlg.dataset.proto);
      if (!/^-?\d+$/.test(raw)) {
        setText('modify-error', 'Enter the duration as a whole number of seconds.');
        return;
      }
      persist = Number(raw);
      if (persist < min || persist > PERSIST_MAX) {
        setText('modify-error', `Persistence must be between ${min} and ${PERSIST_MAX} seconds`);
        return;
      }
    }
    setText('modify-error', '');
    $('modify-ok').disabled = true;
    try {
      await api('PATCH', `/api/listeners/${encodeURIComponent(name)}`, { persist });
      dlg.close();
      refreshSoon();
    } catch (err) {
      if (!err.expired) setText('modify-error', err.message);
    } finally {
      $('modify-ok').disabled = false;
    }
  }

  // ----------------------------------------------------------------- backends

  const BACKEND_COLS = ['addr', 'weight', 'health', 'accepting', 'drain', 'active', 'conns', 'sessions', 'actions'];

  function createBackendRow(listener, addr) {
    const tr = el('tr', { 'data-backend': addr });
    for (const col of BACKEND_COLS) tr.append(el('td', { 'data-col': col }));
    const [addrTd, weightTd, , , , connsTd, sessTd, actTd] = tr.children;
    const swatch = el('span', { class: 'swatch' });
    swatch.style.backgroundColor = colorFor(listener, addr);
    addrTd.append(swatch, el('span', { class: 'mono', text: addr }));
    weightTd.append(el('input', { type: 'number', class: 'weight-input', min: 0, max: 100, step: 1, 'aria-label': `Weight of ${addr}` }),
      el('button', { type: 'button', class: 'btn small weight-save', text: 'Save' }));
    connsTd.className = 'num';
    sessTd.className = 'num';
    actTd.className = 'row-actions';
    actTd.append(el('button', { type: 'button', class: 'btn small drain', text: 'Drain' }),
      el('button', { type: 'button', class: 'btn small maint', text: 'Maintenance' }),
      el('button', { type: 'button', class: 'btn small danger remove', text: 'Remove' }));
    return tr;
  }

  function updateBackendRow(tr, b) {
    const cell = (col) => tr.querySelector(`td[data-col="${col}"]`);
    // Weight: don't overwrite what the operator is typing.
    const input = tr.querySelector('.weight-input');
    const server = String(b.weight);
    const prev = input.dataset.server;
    if (prev === undefined || (input.value === prev && document.activeElement !== input)) input.value = server;
    input.dataset.server = server;
    input.classList.toggle('dirty', input.value !== server);

    const since = b.health_since ? new Date(b.health_since * 1000).toLocaleString() : '';
    cell('health').replaceChildren(pill(b.health, b.health === 'healthy' ? 'ok' : 'bad'),
      el('span', { class: 'sub-inline', text: `since ${fmtAgo(b.health_since)}`, title: since }));
    cell('accepting').replaceChildren(b.accepting ? el('span', { class: 'ok-text', text: 'yes' }) : el('span', { class: 'muted', text: 'no' }));

    let drain;
    const maint = b.state === 'maint';
    const mb = tr.querySelector('.maint');
    setText(mb, maint ? 'Back in service' : 'Maintenance');
    mb.dataset.maint = maint ? '1' : '';
    if (maint) drain = pill('maintenance', 'warn');
    else if (b.draining && b.drain_remaining_secs != null) drain = pill(`draining, cut in ${b.drain_remaining_secs} s`, 'warn');
    else if (b.draining) drain = pill('drained', 'muted');
    else drain = el('span', { class: 'muted', text: '-' });
    cell('drain').replaceChildren(drain);

    const live = b.live || {};
    setText(cell('active'), fmtNum(b.active || 0));
    setText(cell('conns'), fmtNum(live.conns || 0));
    cell('conns').title = `${fmtNum(live.half_open || 0)} half-open`;
    setText(cell('sessions'), fmtNum(live.sessions || 0));
    cell('sessions').title = `${fmtNum(live.pending || 0)} pending`;
  }

  function renderBackends() {
    const l = selectedListener();
    const tbody = $('backends-body');
    setText('backends-listener', l ? l.name : '');
    $('add-backend-submit').disabled = !l;
    if (state.backendsOf !== (l && l.name)) { // another listener: start afresh
      tbody.replaceChildren();
      state.backendRows.clear();
      state.backendsOf = l && l.name;
    }
    const bs = l ? l.backends || [] : [];
    const seen = new Set();
    let prev = null;
    for (const b of bs) {
      seen.add(b.addr);
      let tr = state.backendRows.get(b.addr);
      if (!tr) {
        tr = createBackendRow(l.name, b.addr);
        state.backendRows.set(b.addr, tr);
      }
      updateBackendRow(tr, b);
      const want = prev ? prev.nextSibling : tbody.firstChild;
      if (tr !== want) tbody.insertBefore(tr, want);
      prev = tr;
    }
    for (const [addr, tr] of state.backendRows) {
      if (!seen.has(addr)) { tr.remove(); state.backendRows.delete(addr); }
    }
    const empty = $('backends-empty');
    empty.hidden = bs.length > 0;
    empty.textContent = l ? 'No backends.' : 'Select a listener.';
  }

  const backendPath = (listener, addr) =>
    `/api/listeners/${encodeURIComponent(listener)}/backends/${encodeURIComponent(addr)}`;

  /** Runs a backend change with `button` disabled, reporting failure in #backends-error. */
  async function backendAction(button, fn) {
    if (button) button.disabled = true;
    try {
      await fn();
      setText('backends-error', '');
      refreshSoon();
      return true;
    } catch (err) {
      if (!err.expired) setText('backends-error', err.message);
      return false;
    } finally {
      if (button) button.disabled = false;
    }
  }

  function saveWeight(tr) {
    const listener = state.selected;
    const addr = tr.dataset.backend;
    const input = tr.querySelector('.weight-input');
    const raw = input.value.trim();
    if (!/^\d+$/.test(raw) || Number(raw) > 100) {
      setText('backends-error', 'Weight must be a whole number between 0 and 100.');
      return;
    }
    const weight = Number(raw);
    backendAction(tr.querySelector('.weight-save'), async () => {
      await api('PATCH', backendPath(listener, addr), { weight });
      input.dataset.server = String(weight);
      input.classList.remove('dirty');
    });
  }

  function drainBackend(tr) {
    const listener = state.selected;
    const addr = tr.dataset.backend;
    const answer = window.prompt(
      `Drain ${addr}: it takes no new clients; seconds before its remaining connections are cut (0 = cut now):`,
      String(DRAIN_DEFAULT));
    if (answer === null) return;
    const raw = answer.trim();
    if (!/^\d+$/.test(raw) || Number(raw) > 3600) {
      setText('backends-error', 'Drain timeout must be a whole number of seconds between 0 and 3600.');
      return;
    }
    const n = Number(raw);
    backendAction(tr.querySelector('.drain'),
      () => api('POST', `${backendPath(listener, addr)}/drain`, n === 0 ? { now: true } : { timeout: n }));
  }

  function toggleMaint(tr) {
    const listener = state.selected;
    const addr = tr.dataset.backend;
    const btn = tr.querySelector('.maint');
    const back = btn.dataset.maint === '1';
    if (!back && !window.confirm(
      `Put ${addr} in maintenance? It takes no new clients, its connections are cut now and its health checks stop, until you put it back.`)) return;
    backendAction(btn, () => api('PATCH', backendPath(listener, addr), { state: back ? 'ready' : 'maint' }));
  }

  function removeBackend(tr) {
    const listener = state.selected;
    const addr = tr.dataset.backend;
    if (!window.confirm(`Remove backend ${addr} from ${listener}?`)) return;
    backendAction(tr.querySelector('.remove'), () => api('DELETE', backendPath(listener, addr)));
  }

  function onBackendsClick(e) {
    const btn = e.target.closest('button');
    const tr = e.target.closest('tr[data-backend]');
    if (!btn || !tr) return;
    if (btn.classList.contains('weight-save')) saveWeight(tr);
    else if (btn.classList.contains('drain')) drainBackend(tr);
    else if (btn.classList.contains('maint')) toggleMaint(tr);
    else if (btn.classList.contains('remove')) removeBackend(tr);
  }

  function onBackendsKey(e) {
    if (e.key === 'Enter' && e.target.classList.contains('weight-input')) {
      e.preventDefault();
      saveWeight(e.target.closest('tr'));
    }
  }

  function onWeightInput(e) {
    const input = e.target;
    if (input.classList.contains('weight-input')) input.classList.toggle('dirty', input.value !== input.dataset.server);
  }

  async function onAddBackend(e) {
    e.preventDefault();
    const listener = state.selected;
    if (!listener) return;
    const addr = $('add-backend-addr').value.trim();
    const rawWeight = $('add-backend-weight').value.trim();
    if (!ADDR_RE.test(addr)) {
      setText('backends-error', 'Enter the backend as address:port, e.g. 10.0.10.9:8080 or [2001:db8::9]:8080.');
      return;
    }
    if (!/^\d+$/.test(rawWeight) || Number(rawWeight) > 100) {
      setText('backends-error', 'Weight must be a whole number between 0 and 100.');
      return;
    }
    const ok = await backendAction($('add-backend-submit'), () =>
      api('POST', `/api/listeners/${encodeURIComponent(listener)}/backends`, { addr, weight: Number(rawWeight) }));
    if (ok) {
      $('add-backend-addr').value = '';
      $('add-backend-weight').value = '10';
    }
  }

  // ---------------------------------------------------------------- explorers
  // Sessions and connections can number in the millions: only one page is ever fetched, and
  // only on demand (first show, search, paging, refresh button).

  const EXPLORERS = {
    sessions: {
      cols: 6,
      empty: 'No persistence sessions match.',
      row: (s) => el('tr', null,
        el('td', { text: s.listener }),
        el('td', { class: 'mono', text: s.prefix != null && s.prefix < 32 ? `${s.client}/${s.prefix}` : s.client }),
        el('td', { class: 'mono', text: s.backend }),
        el('td', { class: 'num', text: fmtDuration(s.idle_secs) }),
        el('td', { class: 'num', text: fmtDuration(s.expires_in_secs) }),
        el('td', null, s.pending ? pill('pending', 'warn', 'Not yet confirmed by a completed connection')
          : pill('active', 'ok'))),
    },
    conns: {
      cols: 7,
      empty: 'No connections match.',
      row: (c) => el('tr', null,
        el('td', { text: c.listener }),
        el('td', { text: c.proto }),
        el('td', { class: 'mono', text: c.client }),
        el('td', { class: 'mono', text: c.vip }),
        el('td', { class: 'mono', text: c.backend }),
        el('td', null, pill(c.state, { open: 'ok', udp: 'ok', syn: 'warn', adopted: 'info' }[c.state] || 'muted')),
        el('td', { class: 'num', text: fmtDuration(c.idle_secs) })),
    },
  };

  /** Takes the filter inputs' values; returns whether they changed. */
  function readFilters(kind) {
    const ex = state.explorers[kind];
    const client = $(`${kind}-search`).value.trim();
    const listener = $(`${kind}-listener`).value;
    const changed = client !== ex.client || listener !== ex.listener;
    ex.client = client;
    ex.listener = listener;
    return changed;
  }

  function initExplorer(kind) {
    const ex = state.explorers[kind] = { offset: 0, total: 0, seq: 0, client: '', listener: '' };
    const search = () => { readFilters(kind); ex.offset = 0; loadExplorer(kind); };
    $(`${kind}-form`).addEventListener('submit', (e) => { e.preventDefault(); search(); });
    $(`${kind}-listener`).addEventListener('change', search);
    $(`${kind}-refresh`).addEventListener('click', () => {
      if (readFilters(kind)) ex.offset = 0;
      loadExplorer(kind);
    });
    $(`${kind}-prev`).addEventListener('click', () => {
      ex.offset = Math.max(0, ex.offset - PAGE_SIZE);
      loadExplorer(kind);
    });
    $(`${kind}-next`).addEventListener('click', () => {
      if (ex.offset + PAGE_SIZE < ex.total) { ex.offset += PAGE_SIZE; loadExplorer(kind); }
    });
  }

  async function loadExplorer(kind, retried) {
    const ex = state.explorers[kind];
    const def = EXPLORERS[kind];
    if (ex.client && !CLIENT_RE.test(ex.client)) {
      setText(`${kind}-error`, 'Enter a client address or prefix, e.g. 10.2.0.1, 10.2.0.0/16 or 2001:db8::/64.');
      return;
    }
    const seq = ++ex.seq; // only the latest request's answer is shown
    const q = new URLSearchParams();
    if (ex.listener) q.set('listener', ex.listener);
    if (ex.client) q.set('client', ex.client);
    q.set('offset', String(ex.offset));
    q.set('limit', String(PAGE_SIZE));
    const table = $(`${kind}-table`);
    table.classList.add('loading');
    let data;
    try {
      data = await api('GET', `/api/${kind}?${q}`);
    } catch (err) {
      if (seq === ex.seq) {
        table.classList.remove('loading');
        if (!err.expired) setText(`${kind}-error`, err.message);
      }
      return;
    }
    if (seq !== ex.seq) return;
    table.classList.remove('loading');
    setText(`${kind}-error`, '');
    const items = (data && Array.isArray(data.items)) ? data.items : [];
    ex.total = (data && data.total) || 0;
    ex.offset = data && typeof data.offset === 'number' ? data.offset : ex.offset;
    // The table shrank under our page: show its last page instead (once).
    if (!items.length && ex.total > 0 && ex.offset >= ex.total && !retried) {
      ex.offset = Math.floor((ex.total - 1) / PAGE_SIZE) * PAGE_SIZE;
      loadExplorer(kind, true);
      return;
    }
    const body = $(`${kind}-body`);
    if (items.length) body.replaceChildren(...items.map(def.row));
    else body.replaceChildren(el('tr', { class: 'empty-row' }, el('td', { colspan: def.cols, text: def.empty })));
    setText(`${kind}-page`, ex.total && items.length
      ? `${ex.offset + 1}-${ex.offset + items.length} of ${ex.total}` : `0 of ${ex.total}`);
    $(`${kind}-prev`).disabled = ex.offset <= 0;
    $(`${kind}-next`).disabled = ex.offset + items.length >= ex.total;
  }

  // ------------------------------------------------------------------- charts

  const CHARTS = [
    { id: 'chart-packets', legend: 'packets', field: 'packets', rate: true, unit: '/s' },
    { id: 'chart-new-conns', legend: 'new-conns', field: 'new_conns', rate: true, unit: '/s' },
    { id: 'chart-live-conns', legend: 'live-conns', field: 'live_conns', rate: false, unit: '' },
  ];

  /** A "nice" axis: top and step from 1, 2, 2.5, 5 x 10^n, about 4 steps. */
  function niceScale(max) {
    if (!(max > 0)) return { top: 1, step: 0.25 };
    const rough = max / 4;
    const mag = Math.pow(10, Math.floor(Math.log10(rough)));
    const n = rough / mag;
    const step = (n <= 1 ? 1 : n <= 2 ? 2 : n <= 2.5 ? 2.5 : n <= 5 ? 5 : 10) * mag;
    return { top: step * Math.ceil(max / step - 1e-9), step };
  }

  function drawCharts() {
    const s = state.series;
    const name = state.selected || (state.listeners[0] && state.listeners[0].name) || null;
    setText('charts-listener', name || '');
    const sl = s && Array.isArray(s.listeners) ? s.listeners.find((l) => l.name === name) : null;
    const interval = (s && s.interval_secs) || 5;
    const times = (s && Array.isArray(s.times)) ? s.times : [];
    setText('charts-note', times.length
      ? `last ${fmtDuration(times[times.length - 1] - times[0] + interval)} · ${interval} s intervals` : '');
    const backends = sl ? sl.backends || [] : [];
    let empty = 'No data yet';
    if (!s) empty = 'Loading…';
    else if (!sl) empty = name ? 'No data for this listener yet' : 'No listeners';
    else if (!backends.length) empty = 'No backends';
    for (const c of CHARTS) {
      const lines = backends.map((b) => ({
        label: b.addr,
        color: colorFor(name, b.addr),
        values: (b[c.field] || []).map((v) => (typeof v === 'number' ? (c.rate ? v / interval : v) : null)),
      }));
      const canvas = $(c.id);
      canvas._chart = { times, lines, unit: c.unit, interval, empty };
      drawChart(canvas, null);
      renderLegend(document.querySelector(`.legend[data-chart="${c.legend}"]`), lines);
    }
  }

  function renderLegend(box, lines) {
    const key = lines.map((l) => l.label + l.color).join(',');
    if (box.dataset.key === key) return;
    box.dataset.key = key;
    box.replaceChildren(...lines.map((l) => {
      const sw = el('span', { class: 'swatch' });
      sw.style.backgroundColor = l.color;
      return el('span', { class: 'legend-item' }, sw, el('span', { class: 'mono', text: l.label }));
    }));
  }

  /** Draws `canvas._chart`; `hover` is the index of a point to highlight, or null. */
  function drawChart(canvas, hover) {
    const ch = canvas._chart;
    const w = canvas.clientWidth, h = canvas.clientHeight;
    if (!ch || !w || !h) return;
    // Back the canvas with device pixels so lines stay crisp on HiDPI screens.
    const dpr = window.devicePixelRatio || 1;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    ctx.font = `11px ${FONT}`;
    const { times, lines } = ch;
    if (!times.length || !lines.length) {
      ctx.fillStyle = '#94a3b8';
      ctx.textAlign = 'center';
      ctx.textBaseline = 'middle';
      ctx.fillText(ch.empty, w / 2, h / 2);
      ch.geom = null;
      return;
    }

    let max = 0;
    for (const l of lines) for (const v of l.values) if (v != null && v > max) max = v;
    const { top, step } = niceScale(max);
    const ticks = Math.round(top / step);
    let labelW = 0;
    for (let i = 0; i <= ticks; i++) labelW = Math.max(labelW, ctx.measureText(fmtCompact(i * step)).width);
    const pad = { l: Math.ceil(labelW) + 12, r: 12, t: 10, b: 22 };
    const pw = w - pad.l - pad.r, ph = h - pad.t - pad.b;
    // With a single sample, show one interval so the point has somewhere to sit.
    const t1 = times[times.length - 1];
    const t0 = times.length > 1 ? times[0] : t1 - ch.interval;
    const span = Math.max(1, t1 - t0);
    const x = (t) => pad.l + ((t - t0) / span) * pw;
    const y = (v) => pad.t + ph - (v / top) * ph;

    // Horizontal grid and y labels.
    ctx.lineWidth = 1;
    ctx.textAlign = 'right';
    ctx.textBaseline = 'middle';
    for (let i = 0; i <= ticks; i++) {
      const yy = Math.round(y(i * step)) + 0.5;
      ctx.strokeStyle = i === 0 ? '#cbd5e1' : '#eef1f5';
      ctx.beginPath(); ctx.moveTo(pad.l, yy); ctx.lineTo(w - pad.r, yy); ctx.stroke();
      ctx.fillStyle = '#64748b';
      ctx.fillText(fmtCompact(i * step), pad.l - 6, yy);
    }

    // Time ticks on round clock values, as many as fit.
    const maxTicks = Math.max(2, Math.floor(pw / 70));
    const tStep = [10, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600].find((s) => span / s <= maxTicks) || 3600;
    ctx.textAlign = 'center';
    ctx.textBaseline = 'top';
    for (let t = Math.ceil(t0 / tStep) * tStep; t <= t1; t += tStep) {
      const xx = Math.round(x(t)) + 0.5;
      ctx.strokeStyle = '#cbd5e1';
      ctx.beginPath(); ctx.moveTo(xx, pad.t + ph); ctx.lineTo(xx, pad.t + ph + 4); ctx.stroke();
      ctx.fillStyle = '#64748b';
      ctx.fillText(fmtClock(t, tStep < 60), xx, pad.t + ph + 6);
    }

    // One line per backend.
    ctx.lineWidth = 1.75;
    ctx.lineJoin = 'round';
    ctx.lineCap = 'round';
    for (const l of lines) {
      ctx.strokeStyle = l.color;
      ctx.fillStyle = l.color;
      ctx.beginPath();
      let pen = false, drawn = 0;
      l.values.forEach((v, i) => {
        if (v == null || i >= times.length) { pen = false; return; }
        const px = x(times[i]), py = y(v);
        if (pen) ctx.lineTo(px, py); else ctx.moveTo(px, py);
        pen = true;
        drawn++;
      });
      ctx.stroke();
      if (drawn === 1) { // a lone point has no line: mark it
        const i = l.values.findIndex((v) => v != null);
        ctx.beginPath(); ctx.arc(x(times[i]), y(l.values[i]), 2.5, 0, 2 * Math.PI); ctx.fill();
      }
    }

    // Hover: a vertical rule and the points at that time.
    if (hover != null && hover < times.length) {
      const hx = Math.round(x(times[hover])) + 0.5;
      ctx.strokeStyle = '#94a3b8';
      ctx.lineWidth = 1;
      ctx.beginPath(); ctx.moveTo(hx, pad.t); ctx.lineTo(hx, pad.t + ph); ctx.stroke();
      for (const l of lines) {
        const v = l.values[hover];
        if (v == null) continue;
        ctx.fillStyle = l.color;
        ctx.beginPath(); ctx.arc(hx, y(v), 3, 0, 2 * Math.PI); ctx.fill();
      }
    }
    ch.geom = { x, pad, pw };
  }

  /** Hover tooltip: the nearest sample's time and every backend's value there. */
  function onChartMove(e) {
    const canvas = e.currentTarget;
    const ch = canvas._chart;
    const tip = $('chart-tip');
    if (!ch || !ch.geom) { tip.hidden = true; return; }
    const rect = canvas.getBoundingClientRect();
    const mx = e.clientX - rect.left;
    let best = 0, bestD = Infinity;
    ch.times.forEach((t, i) => {
      const d = Math.abs(ch.geom.x(t) - mx);
      if (d < bestD) { bestD = d; best = i; }
    });
    drawChart(canvas, best);
    const rows = [el('div', { class: 'tip-time', text: fmtClock(ch.times[best], true) })];
    for (const l of ch.lines) {
      const v = l.values[best];
      const sw = el('span', { class: 'swatch' });
      sw.style.backgroundColor = l.color;
      rows.push(el('div', { class: 'tip-row' }, sw, el('span', { class: 'mono', text: l.label }),
        el('span', { class: 'tip-val', text: v == null ? '-' : `${fmtCompact(v)}${ch.unit}` })));
    }
    tip.replaceChildren(...rows);
    tip.hidden = false;
    const card = $('charts').getBoundingClientRect();
    let left = e.clientX - card.left + 14;
    if (left + tip.offsetWidth > card.width - 8) left = e.clientX - card.left - tip.offsetWidth - 14;
    tip.style.left = `${left}px`;
    tip.style.top = `${e.clientY - card.top + 12}px`;
  }

  function onChartLeave(e) {
    $('chart-tip').hidden = true;
    drawChart(e.currentTarget, null);
  }

  // --------------------------------------------------------------------- boot

  function wire() {
    $('login-form').addEventListener('submit', onLogin);
    $('logout').addEventListener('click', onLogout);

    $('listeners-body').addEventListener('click', onListenersClick);
    $('listeners-body').addEventListener('keydown', onListenersKey);

    $('modify-form').addEventListener('submit', onModifySubmit);
    $('modify-cancel').addEventListener('click', () => $('modify-dialog').close());
    $('persist-enabled').addEventListener('change', onPersistToggle);

    $('backends-body').addEventListener('click', onBackendsClick);
    $('backends-body').addEventListener('keydown', onBackendsKey);
    $('backends-body').addEventListener('input', onWeightInput);
    $('add-backend-form').addEventListener('submit', onAddBackend);

    initExplorer('sessions');
    initExplorer('conns');

    for (const c of CHARTS) {
      $(c.id).addEventListener('mousemove', onChartMove);
      $(c.id).addEventListener('mouseleave', onChartLeave);
    }
    let pending = false;
    window.addEventListener('resize', () => {
      if (pending) return;
      pending = true;
      requestAnimationFrame(() => { pending = false; drawCharts(); });
    });
  }

  async function boot() {
    wire();
    // A one-time sign-in link (`clb console link`): take the code out of the address bar
    // (and history) first, then use it.
    const m = location.hash.match(/^#sign-in=([0-9a-f]+)$/);
    if (m) {
      history.replaceState(null, '', location.pathname + location.search);
      try {
        const r = await api('POST', '/api/login', { code: m[1] }, { auth: false });
        state.csrf = r && r.csrf;
        showConsole();
      } catch (err) {
        showLogin(`Sign-in link: ${err.message}`);
      }
      return;
    }
    try {
      const r = await api('GET', '/api/session', undefined, { auth: false });
      state.csrf = r && r.csrf;
      showConsole();
    } catch (err) {
      showLogin(err.status === 401 ? '' : err.message);
    }
  }

  boot();
})();
