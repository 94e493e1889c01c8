"use strict";
// Shared by the pages: JSON calls with the CSRF header, who is logged in, small DOM helpers.

const CSRF_COOKIE = "fa_csrf";
const CSRF_HEADER = "x-csrf-token";

function csrfToken() {
  const hit = document.cookie.split("; ").find((c) => c.startsWith(CSRF_COOKIE + "="));
  return hit ? decodeURIComponent(hit.slice(CSRF_COOKIE.length + 1)) : "";
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// fetch() with the CSRF header on writes; JSON in and out; a 401 sends the page to the login.
async function api(method, url, body) {
  const init = { method, headers: { [CSRF_HEADER]: csrfToken() }, credentials: "same-origin" };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) { init.body = JSON.stringify(body); init.headers["Content-Type"] = "application/json"; }
  const r = await fetch(url, init);
  if (r.status === 401 && !url.endsWith("/api/login")) { location.href = "/login"; throw new ApiError(401, "logged out"); }
  const data = r.headers.get("content-type")?.includes("json") ? await r.json() : null;
  if (!r.ok) {
    let msg = data && data.detail;
    if (Array.isArray(msg)) msg = msg.map((e) => `${e.loc.slice(1).join(".")}: ${e.msg}`).join("; ");
    if (r.status === 429 || r.status === 503) msg = `${msg || "busy"} (retry in ${r.headers.get("retry-after") || "a few"} s)`;
    throw new ApiError(r.status, msg || `error ${r.status}`);
  }
  return data;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function setStatus(node, text, isError = false) {
  node.textContent = text;
  node.classList.toggle("error", isError);
}

// The header's "who": user name, role, logout (hidden without auth).
async function showWho() {
  const me = await api("GET", "/api/me");
  const who = document.getElementById("who");
  who.replaceChildren(el("span", { text: `${me.name} · ${me.role}` }));
  if (me.auth === "tokens") {
    who.append(el("button", { type: "button", id: "logout", text: "Log out", onclick: async () => {
      await api("POST", "/api/logout"); location.href = "/login";
    } }));
  }
  return me;
}
