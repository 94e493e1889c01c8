"use strict";
// The login page: exchange a token for a session cookie, then go to the search page.

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const status = document.getElementById("status");
    try {
      const me = await api("POST", "/api/login", { token: document.getElementById("token").value.trim() });
      setStatus(status, `Welcome, ${me.name}`);
      location.href = "/";
    } catch (err) {
      setStatus(status, err.status === 401 ? "This token is unknown or revoked." : err.message, true);
    }
  });
});
