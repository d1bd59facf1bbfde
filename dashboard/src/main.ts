// The dashboard: a hash-routed single page over the public JSON API, through
// the generated client. Screens: overview, jobs, job detail, dead jobs,
// schedules, members, API keys, sign-in.

import { render } from "preact";
import { html } from "htm/preact";
import { useEffect, useMemo, useState } from "preact/hooks";
import type { Offload } from "@offload/client";

import * as session from "./session";
import { Overview } from "./overview";
import { Jobs } from "./jobs";
import { JobDetail } from "./job";
import { DeadJobs } from "./dead";
import { Schedules } from "./schedules";
import { ApiKeys, Members } from "./admin";

function useRoute(): string {
  const [route, setRoute] = useState(location.hash.slice(1) || "/");
  useEffect(() => {
    const on = () => setRoute(location.hash.slice(1) || "/");
    addEventListener("hashchange", on);
    return () => removeEventListener("hashchange", on);
  }, []);
  return route;
}

function SignIn({ onSignIn }: { onSignIn: (s: session.Session) => void }) {
  const [reason] = useState(session.takeSignOutReason());
  const [error, setError] = useState<string | null>(null);
  const submit = async (e: Event) => {
    e.preventDefault();
    const form = new FormData(e.target as HTMLFormElement);
    const s = {
      workspace: String(form.get("workspace") ?? "").trim(),
      token: String(form.get("token") ?? "").trim(),
    };
    try {
      await session.client(s).stats(60);
      session.save(s);
      onSignIn(s);
    } catch (err) {
      setError(session.takeSignOutReason() ?? session.message(err));
    }
  };
  return html`<main class="signin">
    <h1>Offload</h1>
    <form onSubmit=${submit} class="card">
      <h2>Sign in</h2>
      ${reason && html`<p class="notice" role="status">Signed out: ${reason}</p>`}
      <label>Workspace id<input name="workspace" required autocomplete="off" spellcheck="false" defaultValue=${session.lastWorkspace()} /></label>
      <label>Token or API key
        <textarea name="token" required rows="3" spellcheck="false" placeholder="eyJ… or ofk_…"></textarea>
      </label>
      <p class="muted"><code>offload dev</code> prints both. Kept for this tab only.</p>
      ${error && html`<p class="error" role="alert">${error}</p>`}
      <button type="submit">Sign in</button>
    </form>
  </main>`;
}

const NAV: [string, string][] = [
  ["/", "Overview"],
  ["/jobs", "Jobs"],
  ["/dead", "Dead jobs"],
  ["/schedules", "Schedules"],
  ["/members", "Members"],
  ["/api-keys", "API keys"],
];

function Shell({ api, route, onSignOut }: { api: Offload; route: string; onSignOut: () => void }) {
  const [path, query = ""] = route.split("?");
  const params = new URLSearchParams(query);
  let screen;
  const jobMatch = /^\/jobs\/([0-9a-f-]{36})$/.exec(path ?? "");
  if (jobMatch) screen = html`<${JobDetail} api=${api} id=${jobMatch[1]} />`;
  else if (path === "/jobs") screen = html`<${Jobs} api=${api} params=${params} />`;
  else if (path === "/dead") screen = html`<${DeadJobs} api=${api} />`;
  else if (path === "/schedules") screen = html`<${Schedules} api=${api} />`;
  else if (path === "/members") screen = html`<${Members} api=${api} />`;
  else if (path === "/api-keys") screen = html`<${ApiKeys} api=${api} />`;
  else screen = html`<${Overview} api=${api} />`;
  const current = jobMatch ? "/jobs" : path;
  return html`<div class="shell">
    <header>
      <a class="brand" href="#/">Offload</a>
      <nav aria-label="Main">
        ${NAV.map(
          ([href, label]) =>
            html`<a href=${`#${href}`} aria-current=${current === href ? "page" : undefined}>${label}</a>`,
        )}
      </nav>
      <span class="muted ws" title="Workspace">${api.workspace.slice(0, 8)}…</span>
      <button class="link" onClick=${onSignOut}>Sign out</button>
    </header>
    <main>${screen}</main>
  </div>`;
}

function App() {
  const route = useRoute();
  const [s, setSession] = useState(session.load());
  const api = useMemo(() => (s ? session.client(s) : null), [s]);
  useEffect(() => {
    // A 401 anywhere cleared the session and sent us here.
    if (route === "/signin" && !session.load()) setSession(null);
  }, [route]);
  if (!api || route === "/signin") {
    return html`<${SignIn}
      onSignIn=${(next: session.Session) => {
        setSession(next);
        location.hash = "#/";
      }}
    />`;
  }
  return html`<${Shell}
    api=${api}
    route=${route}
    onSignOut=${() => {
      session.clear();
      setSession(null);
      location.hash = "#/signin";
    }}
  />`;
}

render(html`<${App} />`, document.getElementById("app")!);
