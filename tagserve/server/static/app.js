// tagserve's page: tags text through POST /v1/ner and previews POST /v1/redact.
// All text reaches the DOM through textContent / text nodes, never as markup.
"use strict";

(() => {
  const EXAMPLE = "Barack Obama met Angela Merkel in Berlin on Tuesday to discuss a contract " +
    "between Siemens and the city of Chicago; Alice Smith from Acme Corp joined by phone.";

  const $ = (id) => document.getElementById(id);
  const ui = {
    form: $("tag-form"), text: $("text"), strategy: $("strategy"), bio: $("bio"),
    threshold: $("threshold"),
    tag: $("tag"), example: $("example"), clear: $("clear"), error: $("error"),
    apiKey: $("api-key"), model: $("model-name"), legend: $("legend"), count: $("entity-count"),
    highlighted: $("highlighted"), tooltip: $("tooltip"), mode: $("redact-mode"),
    redacted: $("redacted"), redactNote: $("redact-note"),
  };
  const tokenData = new WeakMap();  // token <span> -> {token, entity}: the server's dicts
  let lastRequest = null;  // {text, strategy, bio, threshold} of the last "Tag"
  let decodingChosen = false;  // the user picked a strategy, BIO decoding or threshold: keep it
  let tagSequence = 0;  // answers of superseded requests are dropped
  let redactSequence = 0;

  // ---- helpers -------------------------------------------------------------------------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function placeholder(container, message) {
    container.replaceChildren(el("p", "placeholder", message));
  }

  // "B-PER", "I-PER" and "PER" share a colour: the hue is a hash (FNV-1a) of the type.
  function labelType(label) {
    return String(label).replace(/^[BIESLU][-_]/, "");
  }

  function hue(label) {
    let hash = 0x811c9dc5;
    for (const ch of labelType(label)) {
      hash = Math.imul(hash ^ ch.codePointAt(0), 0x01000193) >>> 0;
    }
    return hash % 360;
  }

  function colour(node, label) {
    node.style.setProperty("--hue", String(hue(label)));
    return node;
  }

  const labelOf = (entity) => entity.entity_group ?? entity.entity ?? "?";
  const formatScore = (score) => (typeof score === "number" ? score.toFixed(3) : "–");

  // Offsets from the server count code points (Python), not UTF-16 units: slice code points.
  function codePoints(text) {
    return Array.from(text);
  }

  function slice(chars, start, end) {
    return chars.slice(start, end).join("");
  }

  // Entities sorted by start, in bounds, without overlaps (the first one wins).
  function spans(items, length) {
    const sorted = items.filter((item) => Number.isInteger(item.start) &&
      Number.isInteger(item.end) && item.start >= 0 && item.start < item.end &&
      item.end <= length).sort((a, b) => a.start - b.start || b.end - a.end);
    const kept = [];
    for (const item of sorted) {
      if (!kept.length || item.start >= kept[kept.length - 1].end) kept.push(item);
    }
    return kept;
  }

  // ---- API -----------------------------------------------------------------------------

  function errorMessage(response, body) {
    const error = body && body.error;
    let message = response.statusText || "request failed";
    if (typeof error === "string") message = error;
    else if (error && typeof error.message === "string") message = error.message;
    else if (body && typeof body.detail === "string") message = body.detail;
    const hint = response.status === 401 ? " (enter the server's API key above)" : "";
    return `${response.status}: ${message}${hint}`;
  }

  async function api(path, body) {
    const headers = {"Accept": "application/json"};
    const key = ui.apiKey.value.trim();
    if (key) headers.Authorization = `Bearer ${key}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(path, {
        method: body === undefined ? "GET" : "POST", headers,
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (error) {
      throw new Error(`Could not reach the server (${error.message}).`);
    }
    let data = null;
    try {
      data = await response.json();
    } catch {
      data = null;  // not JSON: the status text says enough
    }
    if (!response.ok) throw new Error(errorMessage(response, data));
    return data;
  }

  async function loadModel() {
    try {
      const models = await api("v1/models");
      const first = (models.data || [])[0];
      ui.model.textContent = first ? String(first.id) : "(none)";
    } catch (error) {
      ui.model.textContent = error.message.startsWith("401") ? "(API key needed)" : "(unknown)";
      return;
    }
    await loadDecoding();
  }

  // The served model's recommended decoding (config.json's "tagserve_ner_decoding") becomes
  // the pickers' default; a server without the route, or a choice already made, keeps them.
  async function loadDecoding() {
    let decoding;
    try {
      decoding = await api("v1/ner/decoding");
    } catch {
      return;
    }
    if (decodingChosen) return;
    const pick = (select, value) => {
      if ([...select.options].some((option) => option.value === value)) select.value = value;
    };
    pick(ui.strategy, String(decoding.aggregation_strategy ?? "simple"));
    pick(ui.bio, decoding.bio ? String(decoding.bio) : "");
    ui.threshold.value = typeof decoding.threshold === "number" ? String(decoding.threshold) : "";
  }

  // ---- errors and busy state -----------------------------------------------------------

  function showError(messages) {
    const list = [].concat(messages).filter(Boolean);
    ui.error.replaceChildren(...list.map((message) => el("p", "", message)));
    ui.error.hidden = list.length === 0;
  }

  function setBusy(busy) {
    ui.tag.disabled = busy;
    ui.tag.textContent = busy ? "Tagging…" : "Tag";
    ui.highlighted.setAttribute("aria-busy", String(busy));
  }

  // ---- highlighted text ----------------------------------------------------------------

  function tokenSpan(token, text, entity) {
    const span = el("span", "tok", text);
    span.tabIndex = -1;
    tokenData.set(span, {token, entity});
    return span;
  }

  // Appends chars[from, to) to `parent`: token spans (clipped to the range) and plain text.
  function makeAppender(chars, tokens) {
    let first = 0;  // ranges come in increasing order: tokens before `first` are done
    return (parent, from, to, entity) => {
      while (first < tokens.length && tokens[first].end <= from) first += 1;
      let pos = from;
      for (let i = first; i < tokens.length && tokens[i].start < to; i += 1) {
        const start = Math.max(tokens[i].start, pos);
        const end = Math.min(tokens[i].end, to);
        if (end <= start) continue;
        if (start > pos) parent.append(slice(chars, pos, start));
        parent.append(tokenSpan(tokens[i], slice(chars, start, end), entity));
        pos = end;
      }
      if (pos < to) parent.append(slice(chars, pos, to));
    };
  }

  function renderLegend(entities) {
    const counts = new Map();
    for (const entity of entities) {
      const type = labelType(labelOf(entity));
      counts.set(type, (counts.get(type) || 0) + 1);
    }
    ui.legend.replaceChildren(...[...counts.keys()].sort().map((type) => {
      const item = colour(el("li", "legend-item"), type);
      item.append(el("span", "swatch"), el("span", "legend-label", type),
                  el("span", "legend-count", `×${counts.get(type)}`));
      return item;
    }));
    ui.count.textContent = `(${entities.length})`;
  }

  function renderHighlights(text, result) {
    const chars = codePoints(text);
    const entities = spans(result.entities || [], chars.length);
    const tokens = spans(result.tokens || [], chars.length);
    const append = makeAppender(chars, tokens);
    const body = el("p", "text-body");
    let pos = 0;
    for (const entity of entities) {
      append(body, pos, entity.start, null);
      const label = labelOf(entity);
      const mark = colour(el("mark", "ent"), label);
      mark.dataset.label = label;
      mark.dataset.start = String(entity.start);
      mark.dataset.end = String(entity.end);
      mark.dataset.score = String(entity.score);
      const inner = el("span", "ent-text");
      append(inner, entity.start, entity.end, entity);
      mark.append(inner, el("span", "ent-label", label));
      body.append(mark);
      pos = entity.end;
    }
    append(body, pos, chars.length, null);
    const focusable = body.querySelector(".tok");
    if (focusable) focusable.tabIndex = 0;  // roving tabindex: one stop, then arrow keys
    ui.highlighted.replaceChildren(body);
    if (!entities.length) {
      ui.highlighted.append(el("p", "placeholder", "No entities found (try a lower threshold " +
                                                  "or another strategy)."));
    }
    renderLegend(entities);
  }

  // ---- tooltip -------------------------------------------------------------------------

  function showTooltip(span) {
    const data = tokenData.get(span);
    if (!data) return;
    const {token, entity} = data;
    const rows = [
      ["token", token.token ?? span.textContent],
      ["label", token.label ?? "?"],
      ["probability", formatScore(token.score)],
    ];
    if (entity) rows.push(["entity", `${labelOf(entity)} (${formatScore(entity.score)})`]);
    const list = el("dl");
    for (const [name, value] of rows) list.append(el("dt", "", name), el("dd", "", value));
    colour(ui.tooltip, token.label ?? "O").replaceChildren(list);
    ui.tooltip.hidden = false;
    span.setAttribute("aria-describedby", "tooltip");
    place(span.getBoundingClientRect());
  }

  function place(rect) {
    const tip = ui.tooltip.getBoundingClientRect();
    const margin = 8;
    let left = Math.min(rect.left, window.innerWidth - tip.width - margin);
    let top = rect.bottom + 6;
    if (top + tip.height > window.innerHeight - margin) top = rect.top - tip.height - 6;
    left = Math.max(margin, left);
    ui.tooltip.style.left = `${left}px`;
    ui.tooltip.style.top = `${Math.max(margin, top)}px`;
  }

  function hideTooltip(span) {
    ui.tooltip.hidden = true;
    if (span) span.removeAttribute("aria-describedby");
  }

  function onTokenKey(event) {
    const span = event.target.closest(".tok");
    if (!span) return;
    if (event.key === "Escape") {
      hideTooltip(span);
      return;
    }
    const all = [...ui.highlighted.querySelectorAll(".tok")];
    const at = all.indexOf(span);
    const target = {ArrowRight: at + 1, ArrowDown: at + 1, ArrowLeft: at - 1, ArrowUp: at - 1,
                    Home: 0, End: all.length - 1}[event.key];
    if (target === undefined || !all[target]) return;
    event.preventDefault();
    span.tabIndex = -1;
    all[target].tabIndex = 0;
    all[target].focus();
  }

  // ---- redaction preview ---------------------------------------------------------------

  // The server's text, with the replacements marked when they line up with the entities.
  function renderRedaction(text, item) {
    const chars = codePoints(text);
    const entities = spans(item.entities || [], chars.length);
    const body = el("p", "text-body");
    let pos = 0;
    let rebuilt = "";
    for (const entity of entities) {
      const replacement = String(entity.replacement ?? "");
      const before = slice(chars, pos, entity.start);
      body.append(before);
      const span = colour(el("span", "replacement", replacement), labelOf(entity));
      span.title = labelOf(entity);
      body.append(span);
      rebuilt += before + replacement;
      pos = entity.end;
    }
    body.append(slice(chars, pos, chars.length));
    rebuilt += slice(chars, pos, chars.length);
    if (rebuilt !== item.text) body.replaceChildren(String(item.text ?? ""));
    ui.redacted.replaceChildren(body);
  }

  // Resolves to an error message, or null; a superseded answer is dropped silently.
  async function redact(request) {
    const id = ++redactSequence;
    // /v1/redact groups tokens into entities: the per-token strategy previews with "simple".
    const perToken = request.strategy === "none";
    ui.redactNote.hidden = !perToken;
    try {
      const answer = await api("v1/redact", {
        input: request.text, mode: ui.mode.value, threshold: request.threshold,
        aggregation_strategy: perToken ? "simple" : request.strategy, bio: request.bio,
      });
      if (id === redactSequence) renderRedaction(request.text, answer.data[0]);
      return null;
    } catch (error) {
      if (id !== redactSequence) return null;
      placeholder(ui.redacted, "No preview.");
      return error.message;
    }
  }

  // ---- actions -------------------------------------------------------------------------

  // Resolves to an error message, or null.
  async function runNer(request, id) {
    try {
      const answer = await api("v1/ner", {
        input: request.text, aggregation_strategy: request.strategy, bio: request.bio,
        threshold: request.threshold, return_tokens: true,
      });
      if (id === tagSequence) renderHighlights(request.text, answer.data[0]);
      return null;
    } catch (error) {
      if (id !== tagSequence) return null;
      placeholder(ui.highlighted, "No result.");
      ui.legend.replaceChildren();
      ui.count.textContent = "";
      return error.message;
    }
  }

  // null when empty, undefined when invalid (any value in [0, 1]: the step is for arrow keys).
  function readThreshold() {
    const validity = ui.threshold.validity;
    if (validity.badInput || validity.rangeUnderflow || validity.rangeOverflow) return undefined;
    const raw = ui.threshold.value.trim();
    return raw === "" ? null : Number(raw);
  }

  async function tag(event) {
    event.preventDefault();
    const text = ui.text.value;
    const threshold = readThreshold();
    if (!text.trim()) {
      showError("Enter some text to tag.");
      ui.text.focus();
      return;
    }
    if (threshold === undefined) {
      showError("The threshold must be a number between 0 and 1 (or empty).");
      ui.threshold.focus();
      return;
    }
    const request = {text, strategy: ui.strategy.value, bio: ui.bio.value || null, threshold};
    const id = ++tagSequence;
    lastRequest = request;
    showError([]);
    setBusy(true);
    const errors = await Promise.all([runNer(request, id), redact(request)]);
    if (id !== tagSequence) return;
    setBusy(false);
    showError(errors);
  }

  async function changeMode() {
    if (lastRequest) showError(await redact(lastRequest));
  }

  function clearAll() {
    ++tagSequence;
    ++redactSequence;
    lastRequest = null;
    ui.text.value = "";
    showError([]);
    setBusy(false);
    hideTooltip();
    ui.legend.replaceChildren();
    ui.count.textContent = "";
    placeholder(ui.highlighted, "Entities appear here.");
    placeholder(ui.redacted, "The redacted text appears here.");
    ui.redactNote.hidden = true;
    ui.text.focus();
  }

  // ---- wiring --------------------------------------------------------------------------

  ui.form.addEventListener("submit", tag);
  ui.text.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      ui.form.requestSubmit();
    }
  });
  ui.example.addEventListener("click", () => {
    ui.text.value = EXAMPLE;
    ui.text.focus();
  });
  ui.clear.addEventListener("click", clearAll);
  ui.mode.addEventListener("change", changeMode);
  ui.apiKey.addEventListener("change", loadModel);
  for (const picker of [ui.strategy, ui.bio, ui.threshold]) {
    picker.addEventListener("change", () => { decodingChosen = true; });
  }
  ui.highlighted.addEventListener("mouseover", (event) => {
    const span = event.target.closest(".tok");
    if (span) showTooltip(span);
  });
  ui.highlighted.addEventListener("mouseout", (event) => {
    const span = event.target.closest(".tok");
    if (span && !span.contains(event.relatedTarget)) hideTooltip(span);
  });
  ui.highlighted.addEventListener("focusin", (event) => {
    const span = event.target.closest(".tok");
    if (span) showTooltip(span);
  });
  ui.highlighted.addEventListener("focusout", (event) => hideTooltip(event.target));
  ui.highlighted.addEventListener("keydown", onTokenKey);
  window.addEventListener("scroll", () => hideTooltip(), {passive: true});
  loadModel();
})();
