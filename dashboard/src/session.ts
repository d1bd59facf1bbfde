// Who is signed in: kept in session storage only (gone when the tab closes),
// and dropped on the first 401 so the app returns to sign-in.

import { Offload, OffloadError } from "@offload/client";

export interface Session {
  workspace: string;
  token: string;
}

const KEY = "offload.session";
const LAST_WORKSPACE = "offload.workspace";

/** The workspace last signed in to in this tab, to fill in after a sign-out. */
export function lastWorkspace(): string {
  return sessionStorage.getItem(LAST_WORKSPACE) ?? "";
}

export function load(): Session | null {
  try {
    const raw = sessionStorage.getItem(KEY);
    const s = raw ? (JSON.parse(raw) as Session) : null;
    return s && s.workspace && s.token ? s : null;
  } catch {
    return null;
  }
}

export function save(s: Session) {
  sessionStorage.setItem(KEY, JSON.stringify(s));
  sessionStorage.setItem(LAST_WORKSPACE, s.workspace);
}

export function clear() {
  sessionStorage.removeItem(KEY);
}

let signedOutBecause: string | null = null;

/** Why the last session ended (a 401's detail), once. */
export function takeSignOutReason(): string | null {
  const r = signedOutBecause;
  signedOutBecause = null;
  return r;
}

/** A client for the session; any 401 it meets signs out. */
export function client(s: Session): Offload {
  // On AWS live changes come from the stack's WebSocket API, which the page names.
  const realtimeUrl =
    document.querySelector<HTMLMetaElement>('meta[name="offload-realtime"]')?.content || undefined;
  return new Offload({
    baseUrl: "",
    workspace: s.workspace,
    token: s.token,
    realtimeUrl,
    fetch: async (req: Request) => {
      const resp = await fetch(req);
      if (resp.status === 401) {
        const body = await resp.clone().json().catch(() => null);
        signedOutBecause = body?.detail ?? "your session has expired";
        clear();
        location.hash = "#/signin";
      }
      return resp;
    },
  });
}

export function message(e: unknown): string {
  if (e instanceof OffloadError) return e.field ? `${e.message} (${e.field})` : e.message;
  return e instanceof Error ? e.message : String(e);
}
