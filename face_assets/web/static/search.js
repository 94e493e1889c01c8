"use strict";
// The search page: upload or catalog face -> results with names, match marks and votes; votes undo;
// the last search and the user's votes come back after a reload (sessionStorage + /votes).

const $ = (id) => document.getElementById(id);
const state = { search: null, extra: [], votes: new Map(), file: null, voter: false };
const STORE = "face_assets.lastSearch";
// Material "thumb_up" icon (Apache 2.0), inline: the page loads no external asset or emoji font.
const THUMB = "M1 21h4V9H1v12zm22-11c0-1.1-.9-2-2-2h-6.31l.95-4.57.03-.32c0-.41-.17-.79-.44-1.06L14.17 1 " +
  "7.59 7.59C7.22 7.95 7 8.45 7 9v10c0 1.1.9 2 2 2h9c.83 0 1.54-.5 1.84-1.22l3.02-7.05c.09-.23.14-.47.14-.73v-2z";

function thumbIcon() {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("aria-hidden", "true");
  const path = document.createElementNS(ns, "path");
  path.setAttribute("d", THUMB);
  svg.append(path);
  return svg;
}

function save() {
  sessionStorage.setItem(STORE, JSON.stringify({ search: state.search, extra: state.extra }));
}

async function runSearch(form) {
  setStatus($("status"), "Searching…");
  $("search-btn").disabled = true;
  try {
    state.search = await api("POST", "/api/search", form);
    state.extra = [];
    state.votes = new Map();
    save();
    render();
    const n = state.search.results.length;
    setStatus($("status"), !n ? "No results." : state.voter
      ? `${n} results. Vote: same person (thumbs up) or not (thumbs down).` : `${n} results.`);
    $("results-title").focus();
  } catch (e) {
    setStatus($("status"), e.message, true);
  } finally {
    $("search-btn").disabled = !state.file;
  }
}

function searchFile(faceIndex) {
  const form = new FormData();
  form.append("image", state.file);
  if (faceIndex !== undefined) form.append("face_index", String(faceIndex));
  return runSearch(form);
}

function renderQuery() {
  const s = state.search;
  $("query-section").hidden = false;
  const img = $("query-img");
  const stage = $("stage");
  stage.querySelectorAll(".box").forEach((b) => b.remove());
  img.onload = () => {
    const [w, h] = s.image_size;
    s.faces.forEach((box, i) => {
      const chosen = i === s.face_index;
      const b = el("button", {
        type: "button", class: chosen ? "box chosen" : "box", "data-face-index": String(i),
        "aria-label": chosen ? `face ${i + 1}, searched` : `search face ${i + 1} instead`,
        "aria-pressed": chosen ? "true" : "false", disabled: !chosen && !state.file,
        onclick: () => { if (!chosen) searchFile(i); },
      });
      b.style.left = `${(100 * box[0]) / w}%`;
      b.style.top = `${(100 * box[1]) / h}%`;
      b.style.width = `${(100 * (box[2] - box[0])) / w}%`;
      b.style.height = `${(100 * (box[3] - box[1])) / h}%`;
      stage.append(b);
    });
  };
  img.src = s.image_url;
  $("face-hint").textContent = s.faces.length > 1
    ? `${s.faces.length} faces found; the framed one was searched.` + (state.file ? " Click another face to search it." : "")
    : "";
}

function card(hit) {
  const voted = state.votes.get(hit.face_id);
  const node = el("article", { class: "card" + (hit.is_match ? " match" : "") + (voted ? ` voted-${voted}` : ""),
                               "data-face-id": String(hit.face_id) });
  const name = hit.person || (hit.cluster_id ? `Unnamed person ${hit.cluster_id}` : "Unknown person");
  node.append(
    el("img", { class: "thumb", src: hit.thumbnail_url, alt: `face of ${name}`, loading: "lazy", width: "160", height: "160" }),
    hit.cluster_id
      ? el("a", { class: "name" + (hit.person ? "" : " unnamed"), href: `/people#person/${hit.cluster_id}`, text: name,
                  title: `open ${name}` })
      : el("div", { class: "name unnamed", text: name }),
    el("div", { class: "meta" },
      el("span", { text: `similarity ${hit.similarity.toFixed(3)}` }),
      el("span", { class: hit.is_match ? "badge match" : "badge", text: hit.is_match ? "match" : "no match" })),
  );
  if (!state.voter) return node;  // a viewer cannot vote: no buttons that would fail
  const votes = el("div", { class: "votes", role: "group", "aria-label": `is this the same person? (face ${hit.face_id})` });
  for (const [vote, label] of [["up", "same person"], ["down", "different person"]]) {
    const b = el("button", { type: "button", "data-vote": vote, "aria-label": `thumbs ${vote}: ${label}`,
                             "aria-pressed": voted === vote ? "true" : "false", title: label,
                             onclick: () => castVote(hit, vote, node) });
    b.append(thumbIcon());
    votes.append(b);
  }
  const confirm = el("div", { class: "confirm", "aria-live": "polite" });
  node.append(votes, confirm);
  if (voted) showVoted(node, hit, voted);
  return node;
}

function showVoted(node, hit, vote) {
  const confirm = node.querySelector(".confirm");
  confirm.classList.remove("error");
  confirm.replaceChildren(el("span", { text: `Thanks, recorded: ${vote === "up" ? "same" : "different"} person` }),
    el("button", { type: "button", class: "linkish undo", text: "Undo", onclick: () => clearVote(hit, node) }));
}

function markCard(node, vote) {
  node.classList.remove("voted-up", "voted-down");
  if (vote) node.classList.add(`voted-${vote}`);
  node.querySelectorAll(".votes button").forEach((b) => b.setAttribute("aria-pressed", String(b.dataset.vote === vote)));
}

async function castVote(hit, vote, node) {
  const confirm = node.querySelector(".confirm");
  try {
    await api("POST", "/api/feedback", { query_id: state.search.query_id, result_id: hit.face_id, vote });
    state.votes.set(hit.face_id, vote);
    markCard(node, vote);
    showVoted(node, hit, vote);
  } catch (e) {
    confirm.classList.add("error");
    confirm.replaceChildren(el("span", { text: e.message }));
  }
}

async function clearVote(hit, node) {
  const confirm = node.querySelector(".confirm");
  try {
    await api("DELETE", `/api/feedback/${encodeURIComponent(state.search.query_id)}/${hit.face_id}`);
    state.votes.delete(hit.face_id);
    markCard(node, null);
    confirm.classList.remove("error");
    confirm.replaceChildren(el("span", { text: "Vote withdrawn" }));
    node.querySelector(".votes button").focus();
  } catch (e) {
    confirm.classList.add("error");
    confirm.replaceChildren(el("span", { text: e.message }));
  }
}

function render() {
  const s = state.search;
  renderQuery();
  $("results-section").hidden = false;
  $("legend").textContent = `Green cards are matches: similarity at or above ${s.threshold.toFixed(2)}.`;
  const all = s.results.concat(state.extra);
  $("results").replaceChildren(...all.map(card));
  $("more").hidden = all.length === 0 || all.length >= 200;
}

async function moreResults() {
  const s = state.search;
  const offset = s.results.length + state.extra.length;
  $("more").disabled = true;
  try {
    const more = await api("GET", `/api/queries/${encodeURIComponent(s.query_id)}/results?offset=${offset}&limit=12`);
    state.extra = state.extra.concat(more);
    save();
    more.forEach((hit) => $("results").append(card(hit)));
    if (more.length < 12) $("more").hidden = true;
    setStatus($("status"), more.length ? `${more.length} more results.` : "No more results.");
    const first = $("results").children[offset];
    if (first) first.querySelector("button").focus();
  } catch (e) {
    setStatus($("status"), e.message, true);
  } finally {
    $("more").disabled = false;
  }
}

async function restore() {
  const saved = JSON.parse(sessionStorage.getItem(STORE) || "null");
  if (!saved || !saved.search) return;
  state.search = saved.search;
  state.extra = saved.extra || [];
  try {
    const mine = await api("GET", `/api/queries/${encodeURIComponent(state.search.query_id)}/votes`);
    state.votes = new Map(mine.map((v) => [v.result_id, v.vote]));
  } catch (e) {
    sessionStorage.removeItem(STORE);  // the query is gone (another user, or a wiped store)
    state.search = null;
    return;
  }
  render();
  setStatus($("status"), `Your last search, with your ${state.votes.size} vote(s).`);
}

function pickFile(file) {
  state.file = file || null;
  $("file-name").textContent = file ? file.name : "or drop one here";
  $("search-btn").disabled = !file;
}

document.addEventListener("DOMContentLoaded", async () => {
  $("file").addEventListener("change", (e) => pickFile(e.target.files[0]));
  $("search-form").addEventListener("submit", (e) => { e.preventDefault(); if (state.file) searchFile(); });
  $("more").addEventListener("click", moreResults);
  const zone = $("dropzone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault(); zone.classList.remove("over");
    if (e.dataTransfer.files.length) { pickFile(e.dataTransfer.files[0]); searchFile(); }
  });
  const me = await showWho();
  state.voter = me.role !== "viewer";
  const face = new URLSearchParams(location.search).get("face");
  if (face && /^\d+$/.test(face)) {
    const form = new FormData();
    form.append("face_id", face);
    history.replaceState(null, "", "/");
    await runSearch(form);
  } else {
    await restore();
  }
});
