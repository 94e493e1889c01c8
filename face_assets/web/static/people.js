"use strict";
// The people page: persons (cover, name, face count), paged and found by name or id by the server;
// one person's faces with rename, merge, move and split. The other person of a merge or move is
// picked from the server's matches (or typed as an exact name), never read out of free text; every
// merge, move and split is confirmed on a dialog showing both sides; each change can be undone from
// "Recent changes". Requests name the person they were made on, and an answer that arrives after
// another person was opened is not applied to the page.

const $ = (id) => document.getElementById(id);
const PAGE = 48;
const FACES = 200;
// viewing: the id of the person the view shows (or says is gone); person: its data once loaded.
const state = { offset: 0, q: "", total: 0, viewing: null, person: null, faces: [], selected: new Set(), target: null,
                seq: 0, reviewer: false, flash: null };

const personName = (p) => p.name || `Unnamed person ${p.cluster_id}`;
const faceCount = (n) => `${n} face${n === 1 ? "" : "s"}`;

function cover(p, size) {
  return p && p.cover_url
    ? el("img", { class: "thumb", src: p.cover_url, alt: "", loading: "lazy", width: String(size), height: String(size) })
    : el("div", { class: "thumb" });
}

function personCard(p) {
  return el("a", { class: "person", href: `#person/${p.cluster_id}`, "data-cluster-id": String(p.cluster_id),
                   "aria-label": `${personName(p)}, ${faceCount(p.size)}` },
    el("div", { class: "card" }, cover(p, 160),
      el("div", { class: "name" + (p.name ? "" : " unnamed"), text: personName(p), title: personName(p) }),
      el("div", { class: "meta" }, el("span", { text: faceCount(p.size) }),
        el("span", { class: "badge", text: `#${p.cluster_id}` }))));
}

// -- the list ------------------------------------------------------------------------------------
async function loadList() {
  try {
    const page = await api("GET", `/api/people?offset=${state.offset}&limit=${PAGE}&q=${encodeURIComponent(state.q)}`);
    state.total = page.total;
    $("people").replaceChildren(...page.items.map(personCard));
    const last = Math.min(state.offset + PAGE, page.total);
    $("page-info").textContent = page.total ? `${state.offset + 1}–${last} of ${page.total}` : "";
    $("prev").disabled = state.offset === 0;
    $("next").disabled = last >= page.total;
    setStatus($("status"), page.total ? (state.q ? `${page.total} found.` : "")
      : (state.q ? `Nobody named like “${state.q}”.` : "No people yet: run the clustering."));
  } catch (e) {
    setStatus($("status"), e.message, true);
  }
}

function showList() {
  state.seq += 1;  // answers for the person that was open are not applied any more
  state.viewing = null;
  state.person = null;
  $("person-view").hidden = true;
  $("list-view").hidden = false;
  loadList();
  loadChanges(null);
}

// -- one person ----------------------------------------------------------------------------------
function faceButton(f) {
  const b = el("button", { type: "button", class: "face", "aria-pressed": "false", "data-face-id": String(f.face_id),
                           "aria-label": `face ${f.face_id}` },
    el("img", { class: "thumb", src: f.thumbnail_url, alt: "", loading: "lazy", width: "110", height: "110" }));
  b.addEventListener("click", () => {
    const on = !state.selected.has(f.face_id);
    if (on) state.selected.add(f.face_id); else state.selected.delete(f.face_id);
    b.setAttribute("aria-pressed", String(on));
    updateButtons();
  });
  b.addEventListener("dblclick", () => { location.href = `/?face=${f.face_id}`; });
  return b;
}

function updateButtons() {
  const n = state.selected.size, p = state.person, t = state.target;
  $("selection").textContent = n ? `${faceCount(n)} selected` : "Select faces to move them or make them a new person.";
  $("merge-btn").disabled = !p || !t;
  $("move-btn").disabled = !p || !t || n === 0;
  $("split-btn").disabled = !p || n === 0 || n >= p.size;
  $("search-face-btn").disabled = n !== 1;
  $("rename-btn").disabled = $("name").disabled = !p;
}

function resetPicker() {
  state.target = null;
  $("target-q").value = "";
  $("suggestions").replaceChildren();
  $("target").replaceChildren();
}

async function openPerson(id) {
  const seq = ++state.seq;
  const message = state.flash;
  state.flash = null;
  state.viewing = id;
  state.person = null;
  state.faces = [];
  state.selected = new Set();
  resetPicker();
  $("list-view").hidden = true;
  $("person-view").hidden = false;
  $("person-title").textContent = `Person #${id}`;
  $("rename-form").dataset.clusterId = "";
  $("name").value = "";
  $("faces").replaceChildren();
  $("more-faces").hidden = true;
  updateButtons();
  setStatus($("person-status"), "Loading…");
  try {
    const p = await api("GET", `/api/people/${id}?limit=${FACES}`);
    if (seq !== state.seq) return;  // another person was opened meanwhile
    state.person = p;
    state.faces = p.faces;
    $("person-title").textContent = `${personName(p)} · ${faceCount(p.size)}`;
    $("name").value = p.name || "";
    $("rename-form").dataset.clusterId = String(p.cluster_id);
    $("faces").replaceChildren(...p.faces.map(faceButton));
    $("more-faces").hidden = p.faces.length >= p.size;
    updateButtons();
    if (message) showDone(message.text, message.change);
    else setStatus($("person-status"), "Select one face (or double-click it) to search with it.");
  } catch (e) {
    if (seq !== state.seq) return;
    $("person-title").textContent = `No person #${id}`;
    setStatus($("person-status"), e.status === 404
      ? "This person no longer exists: it was merged into another one or all its faces were moved (see the recent changes)."
      : e.message, true);
  }
  $("person-title").focus();
  loadChanges(id);
}

async function moreFaces() {
  const p = state.person, seq = state.seq;
  try {
    const page = await api("GET", `/api/people/${p.cluster_id}?limit=${FACES}&offset=${state.faces.length}`);
    if (seq !== state.seq) return;
    state.faces = state.faces.concat(page.faces);
    const first = page.faces.map(faceButton);
    $("faces").append(...first);
    $("more-faces").hidden = state.faces.length >= page.size;
    if (first.length) first[0].focus();
  } catch (e) {
    setStatus($("person-status"), e.message, true);
  }
}

// Open person `id` with a message (and an undo button for `change`).
function go(id, text, change) {
  state.flash = { text, change };
  if (location.hash === `#person/${id}`) openPerson(id);
  else location.hash = `#person/${id}`;
}

function showDone(text, change) {
  const node = $("person-view").hidden ? $("status") : $("person-status");
  setStatus(node, text);
  if (change) node.append(" ", el("button", { type: "button", class: "linkish", text: "Undo", onclick: () => act(() => undo(change)) }));
}

// -- the other person: picked, never parsed ------------------------------------------------------
let suggestTimer = null;

async function suggest(limit = 8) {
  const q = $("target-q").value.trim();
  const seq = state.seq;
  if (!q || !state.person) { $("suggestions").replaceChildren(); return []; }
  const page = await api("GET", `/api/people?limit=${limit}&q=${encodeURIComponent(q)}`);
  if (seq !== state.seq || q !== $("target-q").value.trim()) return [];
  const items = page.items.filter((p) => p.cluster_id !== state.person.cluster_id);
  $("suggestions").replaceChildren(...(items.length ? items.map((p) => el("li", {},
    el("button", { type: "button", class: "suggestion", "data-cluster-id": String(p.cluster_id),
                   "aria-label": `Choose ${personName(p)}, ${faceCount(p.size)}, number ${p.cluster_id}`,
                   onclick: () => choose(p) },
      cover(p, 40), el("span", { class: "name", text: personName(p) }),
      el("span", { class: "muted", text: `${faceCount(p.size)} · #${p.cluster_id}` }))))
    : [el("li", { class: "muted", text: "Nobody else matches." })]));
  return items;
}

function choose(p) {
  state.target = p;
  $("suggestions").replaceChildren();
  $("target-q").value = p.name || `#${p.cluster_id}`;
  $("target").replaceChildren(el("div", { class: "chosen", tabindex: "-1", id: "chosen", "data-cluster-id": String(p.cluster_id) },
    cover(p, 48), el("span", { text: `Chosen: ${personName(p)} · ${faceCount(p.size)} · #${p.cluster_id}` })));
  updateButtons();
  $("chosen").focus();
}

async function pickExact() {
  const typed = $("target-q").value.trim().normalize("NFC").toLocaleLowerCase();
  const exact = (await suggest(50)).filter((p) => p.name && p.name.normalize("NFC").toLocaleLowerCase() === typed);
  if (exact.length === 1) choose(exact[0]);
  else setStatus($("person-status"), exact.length ? "Several people have this name: pick one from the list."
    : "Nobody has exactly this name: pick a person from the list.", true);
}

// -- confirmation showing both sides -------------------------------------------------------------
function side(label, p, count, faces) {
  const box = [el("div", { class: "side-label muted", text: label })];
  if (faces && faces.length) {
    box.push(el("div", { class: "mini" }, ...faces.slice(0, 6).map((f) =>
      el("img", { class: "thumb", src: `/api/faces/${f}/thumbnail`, alt: "", width: "48", height: "48" }))));
  } else {
    box.push(cover(p, 96));
  }
  box.push(el("div", { class: "name", text: p ? personName(p) : "New person (no name)" }),
           el("div", { class: "muted", text: `${faceCount(count)}${p ? ` · #${p.cluster_id}` : ""}` }));
  return box;
}

function confirmChange(title, a, b, result, ok) {
  const dialog = $("confirm");
  $("confirm-title").textContent = title;
  $("side-a").replaceChildren(...a);
  $("side-b").replaceChildren(...b);
  $("confirm-result").textContent = result;
  $("confirm-ok").textContent = ok;
  return new Promise((resolve) => {
    const finish = (answer) => { dialog.close(); resolve(answer); };
    $("confirm-ok").onclick = () => finish(true);
    $("confirm-cancel").onclick = () => finish(false);
    dialog.oncancel = () => resolve(false);
    dialog.showModal();
    $("confirm-cancel").focus();
  });
}

// -- changes -------------------------------------------------------------------------------------
async function merge() {
  const p = state.person, t = state.target;
  const keep = p.size > t.size || (p.size === t.size && p.cluster_id < t.cluster_id) ? p : t;
  const other = keep === p ? t : p;
  const name = keep.name || other.name;
  if (!await confirmChange("Merge these two people?", side("This person", p, p.size), side("Chosen person", t, t.size),
    `They become one person: #${keep.cluster_id}${name ? ` “${name}”` : ""} with ${faceCount(p.size + t.size)}; ` +
    `#${other.cluster_id} goes away.`, "Merge")) return;
  const out = await api("POST", "/api/people/merge", { cluster_ids: [p.cluster_id, t.cluster_id] });
  const kept = out.persons[0];
  finish(p, kept.cluster_id, `Merged #${p.cluster_id} and #${t.cluster_id} into ${personName(kept)} (${faceCount(kept.size)}).`,
         out.change_id);
}

async function move() {
  const p = state.person, t = state.target, faces = [...state.selected];
  const left = p.size - faces.length;
  if (!await confirmChange(`Move ${faceCount(faces.length)} to ${personName(t)}?`,
    side("Selected faces of this person", p, faces.length, faces), side("Chosen person", t, t.size),
    `${personName(t)} then has ${faceCount(t.size + faces.length)}; ` +
    (left ? `${personName(p)} keeps ${faceCount(left)}.` : `${personName(p)} has no faces left and goes away.`), "Move")) return;
  const out = await api("POST", `/api/people/${p.cluster_id}/move`, { face_ids: faces, to: t.cluster_id });
  const text = `Moved ${faceCount(faces.length)} from #${p.cluster_id} to ${personName(out.persons[0])}.`;
  finish(p, out.persons.length > 1 ? p.cluster_id : t.cluster_id,
         out.persons.length > 1 ? text : `${text} #${p.cluster_id} had no faces left and is gone.`, out.change_id);
}

async function split() {
  const p = state.person, faces = [...state.selected];
  if (!await confirmChange(`Make ${faceCount(faces.length)} a new person?`,
    side("Selected faces of this person", p, faces.length, faces), side("Become", null, faces.length),
    `The selected faces become a new person with no name; ${personName(p)} keeps its name and ` +
    `${faceCount(p.size - faces.length)}.`, "Make a new person")) return;
  const out = await api("POST", `/api/people/${p.cluster_id}/split`, { face_ids: faces });
  const made = out.persons[out.persons.length - 1];
  finish(p, made.cluster_id, `The ${faceCount(made.size)} are now a new person, #${made.cluster_id}; ` +
         `#${p.cluster_id} kept ${faceCount(out.persons[0].size)}.`, out.change_id);
}

async function rename(event) {
  event.preventDefault();
  const id = Number($("rename-form").dataset.clusterId);
  const out = await api("POST", `/api/people/${id}/rename`, { name: $("name").value });
  const p = out.persons[0];
  finish({ cluster_id: id }, id, p.name ? `Renamed to ${p.name}.` : "Name cleared.", out.change_id);
}

// After a change made on person `from`: show `openId` with the message, unless the user opened
// another person meanwhile (then only the message is shown, and nothing is reloaded under them).
function finish(from, openId, text, change) {
  if (!state.person || state.person.cluster_id !== from.cluster_id) {
    showDone(text, change);
    return;
  }
  go(openId, text, change);
}

async function undo(change) {
  const out = await api("POST", `/api/audit/${change}/undo`);
  const text = `Change ${change} undone.`;
  if (state.viewing === null) {
    showDone(text, out.change_id);
    loadList();
    loadChanges(null);
    return;
  }
  const here = out.persons.find((p) => p.cluster_id === state.viewing);
  go(here ? here.cluster_id : out.persons[0].cluster_id, text, out.change_id);
}

function describe(e) {
  const ids = (list) => list.map((c) => `#${c}`).join(" and ");
  const quoted = (name) => (name ? `“${name}”` : "no name");
  switch (e.action) {
    case "rename": return `renamed #${e.cluster_id} from ${quoted(e.old)} to ${quoted(e.new)}`;
    case "merge": return `merged ${ids(e.cluster_ids)} into #${e.kept}`;
    case "split": return `made ${faceCount((e.parts || []).reduce((n, c) => n + (e.sizes[c] || 0), 0))} of #${e.cluster_id} a new person ${ids(e.parts || [])}`;
    case "move": return `moved ${faceCount((e.face_ids || []).length)} from #${e.cluster_id} to #${e.to}`;
    case "undo": return `undid change ${e.undoes} (${e.of})`;
    default: return e.action;
  }
}

async function loadChanges(clusterId) {
  if (!state.reviewer) return;
  const seq = state.seq;
  try {
    const list = await api("GET", `/api/audit?limit=10${clusterId ? `&cluster_id=${clusterId}` : ""}`);
    if (seq !== state.seq) return;
    $("changes-title").textContent = clusterId ? `Recent changes of #${clusterId}` : "Recent changes";
    $("changes").replaceChildren(...(list.length ? list.map((e) => el("li", { "data-change-id": String(e.id) },
      el("span", { text: `${e.actor} ${describe(e)}` }),
      el("span", { class: "muted", text: ` · ${new Date(e.at).toLocaleString()} · change ${e.id} ` }),
      e.undone_by ? el("span", { class: "muted", text: `(undone by change ${e.undone_by})` })
        : e.changes ? el("button", { type: "button", class: "linkish undo", text: e.action === "undo" ? "Redo" : "Undo",
                                    onclick: () => act(() => undo(e.id)) }) : null))
      : [el("li", { class: "muted", text: "No changes yet." })]));
  } catch (e) {
    $("changes").replaceChildren(el("li", { class: "error", text: e.message }));
  }
}

async function act(fn) {
  try {
    await fn();
  } catch (e) {
    setStatus($("person-view").hidden ? $("status") : $("person-status"), e.message, true);
  }
}

function route() {
  const m = /^#person\/(\d+)$/.exec(location.hash);
  if (m) openPerson(Number(m[1]));
  else showList();
}

document.addEventListener("DOMContentLoaded", async () => {
  const me = await showWho();
  state.reviewer = me.role !== "viewer";
  document.querySelectorAll(".reviewer-only").forEach((node) => { node.hidden = !state.reviewer; });
  $("filter-form").addEventListener("submit", (e) => { e.preventDefault(); state.q = $("q").value.trim(); state.offset = 0; loadList(); });
  $("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE); loadList(); });
  $("next").addEventListener("click", () => { state.offset += PAGE; loadList(); });
  $("back").addEventListener("click", (e) => {
    e.preventDefault();
    location.hash = "";
    $("list-title").focus();
  });
  $("rename-form").addEventListener("submit", (e) => act(() => rename(e)));
  $("target-q").addEventListener("input", () => {
    clearTimeout(suggestTimer);
    state.target = null;
    $("target").replaceChildren();
    updateButtons();
    suggestTimer = setTimeout(() => act(() => suggest()), 200);
  });
  $("target-q").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); act(pickExact); } });
  $("merge-btn").addEventListener("click", () => act(merge));
  $("move-btn").addEventListener("click", () => act(move));
  $("split-btn").addEventListener("click", () => act(split));
  $("more-faces").addEventListener("click", moreFaces);
  $("search-face-btn").addEventListener("click", () => { location.href = `/?face=${[...state.selected][0]}`; });
  window.addEventListener("hashchange", route);
  route();
});
