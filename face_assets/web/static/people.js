"use strict";
// The people page: persons (cover, name, face count), paged and searchable by name; one person's
// faces with rename, merge, move and split. Every change goes through the API, which logs it.

const $ = (id) => document.getElementById(id);
const PAGE = 48;
const state = { offset: 0, q: "", total: 0, person: null, selected: new Set() };

function personCard(p) {
  const name = p.name || `Unnamed person ${p.cluster_id}`;
  return el("a", { class: "person", href: `#person/${p.cluster_id}`, "data-cluster-id": String(p.cluster_id) },
    el("div", { class: "card" },
      p.cover_url ? el("img", { class: "thumb", src: p.cover_url, alt: "", loading: "lazy", width: "160", height: "160" })
                  : el("div", { class: "thumb" }),
      el("div", { class: "name" + (p.name ? "" : " unnamed"), text: name, title: name }),
      el("div", { class: "meta" }, el("span", { text: `${p.size} face${p.size === 1 ? "" : "s"}` }),
        el("span", { class: "badge", text: `#${p.cluster_id}` }))));
}

async function loadList() {
  try {
    const page = await api("GET", `/api/people?offset=${state.offset}&limit=${PAGE}&q=${encodeURIComponent(state.q)}`);
    state.total = page.total;
    $("people").replaceChildren(...page.items.map(personCard));
    const last = Math.min(state.offset + PAGE, page.total);
    $("page-info").textContent = page.total ? `${state.offset + 1}–${last} of ${page.total}` : "";
    $("prev").disabled = state.offset === 0;
    $("next").disabled = last >= page.total;
    setStatus($("status"), page.total ? "" : (state.q ? `Nobody named like “${state.q}”.` : "No people yet: run the clustering."));
  } catch (e) {
    setStatus($("status"), e.message, true);
  }
}

async function loadNames() {
  const page = await api("GET", "/api/people?limit=200");
  $("people-names").replaceChildren(...page.items.map((p) => el("option", { value: `${p.name || "Unnamed"} #${p.cluster_id}` })));
}

function targetId() {
  const m = /#?(\d+)\s*$/.exec($("target").value.trim());
  return m ? Number(m[1]) : null;
}

function updateSelection() {
  const n = state.selected.size;
  $("selection").textContent = n ? `${n} face${n === 1 ? "" : "s"} selected` : "Select faces to move or split them.";
  $("move-btn").disabled = n === 0;
  $("split-btn").disabled = n === 0;
  $("search-face-btn").disabled = n !== 1;
}

async function openPerson(id, message) {
  try {
    const p = await api("GET", `/api/people/${id}`);
    state.person = p;
    state.selected = new Set();
    $("list-view").hidden = true;
    $("person-view").hidden = false;
    $("person-title").textContent = `${p.name || `Unnamed person ${p.cluster_id}`} · ${p.size} face${p.size === 1 ? "" : "s"}`;
    $("name").value = p.name || "";
    $("faces").replaceChildren(...p.faces.map((f) => {
      const b = el("button", { type: "button", class: "face", "aria-pressed": "false", "data-face-id": String(f.face_id),
                               "aria-label": `face ${f.face_id}` },
        el("img", { class: "thumb", src: f.thumbnail_url, alt: "", loading: "lazy", width: "110", height: "110" }));
      b.addEventListener("click", () => {
        const on = !state.selected.has(f.face_id);
        if (on) state.selected.add(f.face_id); else state.selected.delete(f.face_id);
        b.setAttribute("aria-pressed", String(on));
        updateSelection();
      });
      b.addEventListener("dblclick", () => { location.href = `/?face=${f.face_id}`; });
      return b;
    }));
    updateSelection();
    setStatus($("person-status"), message || "Select one face (or double-click it) to search with it.");
    $("person-title").focus?.();
  } catch (e) {
    setStatus($("person-status"), e.message, true);
  }
}

async function act(fn) {
  try {
    await fn();
  } catch (e) {
    setStatus($("person-status"), e.message, true);
  }
}

function route() {
  const m = /^#person\/(\d+)$/.exec(location.hash);
  if (m) openPerson(Number(m[1]));
  else { $("person-view").hidden = true; $("list-view").hidden = false; loadList(); }
}

document.addEventListener("DOMContentLoaded", async () => {
  await showWho();
  $("filter-form").addEventListener("submit", (e) => { e.preventDefault(); state.q = $("q").value.trim(); state.offset = 0; loadList(); });
  $("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE); loadList(); });
  $("next").addEventListener("click", () => { state.offset += PAGE; loadList(); });
  $("back").addEventListener("click", (e) => { e.preventDefault(); location.hash = ""; });
  $("rename-form").addEventListener("submit", (e) => { e.preventDefault(); act(async () => {
    const p = await api("POST", `/api/people/${state.person.cluster_id}/rename`, { name: $("name").value });
    await openPerson(p.cluster_id, p.name ? `Renamed to ${p.name}.` : "Name cleared.");
  }); });
  $("merge-btn").addEventListener("click", () => act(async () => {
    const other = targetId();
    if (!other) throw new Error("Choose the other person first.");
    const p = await api("POST", "/api/people/merge", { cluster_ids: [state.person.cluster_id, other] });
    location.hash = `#person/${p.cluster_id}`;
    await openPerson(p.cluster_id, `Merged: ${p.size} faces.`);
  }));
  $("move-btn").addEventListener("click", () => act(async () => {
    const other = targetId();
    if (!other) throw new Error("Choose the person that receives the faces.");
    await api("POST", `/api/people/${state.person.cluster_id}/move`, { face_ids: [...state.selected], to: other });
    await openPerson(state.person.cluster_id, `Moved ${state.selected.size} face(s) to #${other}.`);
  }));
  $("split-btn").addEventListener("click", () => act(async () => {
    const parts = await api("POST", `/api/people/${state.person.cluster_id}/split`, { face_ids: [...state.selected] });
    await openPerson(state.person.cluster_id, `Split into ${parts.map((p) => `#${p.cluster_id} (${p.size})`).join(" and ")}.`);
  }));
  $("search-face-btn").addEventListener("click", () => { location.href = `/?face=${[...state.selected][0]}`; });
  window.addEventListener("hashchange", route);
  route();
  loadNames().catch(() => {});
});
