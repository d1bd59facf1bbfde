// What admins manage: the workspace's members (people, by their identity
// provider's subject and issuer, and their role) and its API keys (a key's
// secret shown once, at its creation). Others are told only admins manage
// these: the API answers them 403.

import { html } from "htm/preact";
import { useState } from "preact/hooks";
import { OffloadError, type Member, type Offload } from "@offload/client";
import { usePolled } from "./hooks";
import { ago } from "./format";
import { message } from "./session";

const ROLES = ["member", "admin"];

/** A list, or `false` when the viewer is not an admin. */
async function unlessForbidden<T>(load: Promise<T>): Promise<T | false> {
  try {
    return await load;
  } catch (e) {
    if (e instanceof OffloadError && e.status === 403) return false;
    throw e;
  }
}

/** Busy, a note and an error around the calls a page makes. */
function useAct(reload: () => void) {
  const [busy, setBusy] = useState(false);
  const [note, setNote] = useState<string | null>(null);
  const [error, setError] = useState<string | null>(null);
  const act = async (f: () => Promise<string | null>) => {
    setBusy(true);
    setError(null);
    setNote(null);
    try {
      setNote(await f());
      return true;
    } catch (e) {
      setError(message(e));
      return false;
    } finally {
      setBusy(false);
      reload();
    }
  };
  return { busy, note, error, act };
}

const roleOptions = (selected?: string) =>
  ROLES.map((r) => html`<option value=${r} selected=${r === selected}>${r}</option>`);

export function Members({ api }: { api: Offload }) {
  const { data, error, reload } = usePolled(() => unlessForbidden(api.listMembers()), 10_000, [api]);
  const { busy, note, error: actError, act } = useAct(reload);
  if (data === false) {
    return html`<h1>Members</h1><p class="card">Only the workspace's admins manage its members.</p>`;
  }
  // The API lets the last admin go; nobody but the platform could then manage the workspace.
  const lastAdmin = (m: Member) =>
    m.role === "admin" && (data || []).filter((x) => x.role === "admin").length === 1
      ? ` ${m.subject} is the only admin: after this, nobody here can manage members or API keys.`
      : "";
  const setRole = (m: Member, select: HTMLSelectElement) => {
    const role = select.value;
    if (lastAdmin(m) && !confirm(`Make ${m.subject} a ${role}?${lastAdmin(m)}`)) {
      select.value = m.role;
      return;
    }
    act(async () => {
      const changed = await api.addMember({ subject: m.subject, issuer: m.issuer, role });
      return `${changed.subject} is now ${changed.role}.`;
    });
  };
  const add = async (e: Event) => {
    e.preventDefault();
    const formEl = e.target as HTMLFormElement;
    const form = new FormData(formEl);
    const subject = String(form.get("subject")).trim();
    const issuer = String(form.get("issuer") ?? "").trim() || undefined;
    const role = String(form.get("role"));
    const ok = await act(async () => {
      const m = await api.addMember({ subject, issuer, role });
      return `${m.subject} is a${m.role === "admin" ? "n" : ""} ${m.role}.`;
    });
    if (ok) formEl.reset();
  };
  return html`<h1>Members</h1>
    ${error && html`<p class="error" role="alert">${error}</p>`}
    ${note && html`<p class="notice" role="status">${note}</p>`}
    ${actError && html`<p class="error" role="alert">${actError}</p>`}
    <div class="table-wrap card">
      <table class="members">
        <caption class="muted">${data ? `${data.length} member${data.length === 1 ? "" : "s"}` : "Loading…"}</caption>
        <thead><tr><th scope="col">Subject</th><th scope="col">Issuer</th><th scope="col">Role</th><th scope="col">Added</th><th scope="col"><span class="sr-only">Actions</span></th></tr></thead>
        <tbody>
          ${data?.map((m) => html`<tr data-member=${m.id}>
            <th scope="row" class="mono">${m.subject}</th>
            <td>${m.issuer ?? html`<span class="muted">any</span>`}</td>
            <td><select aria-label=${`Role of ${m.subject}`} disabled=${busy}
              onChange=${(e: Event) => setRole(m, e.target as HTMLSelectElement)}>${roleOptions(m.role)}</select></td>
            <td title=${m.created_at}>${ago(m.created_at)}</td>
            <td><button class="danger" disabled=${busy} aria-label=${`Remove member ${m.subject}`}
              onClick=${() => confirm(`Remove ${m.subject}? Their tokens open nothing in this workspace from then on.${lastAdmin(m)}`) &&
                act(async () => (await api.removeMember(m.id), `${m.subject} was removed.`))}>Remove</button></td>
          </tr>`)}
        </tbody>
      </table>
    </div>
    <form class="card admin-form" onSubmit=${add} aria-label="Add a member">
      <h2>Add a member</h2>
      <label>Subject (the token's sub)<input name="subject" required maxLength="255" spellcheck="false" placeholder="auth0|65f…" /></label>
      <label>Issuer (optional)<input name="issuer" spellcheck="false" placeholder="any issuer this deployment accepts" /></label>
      <label>Role<select name="role">${roleOptions("member")}</select></label>
      <button type="submit" disabled=${busy}>Add member</button>
    </form>`;
}

export function ApiKeys({ api }: { api: Offload }) {
  const { data, error, reload } = usePolled(() => unlessForbidden(api.listApiKeys()), 10_000, [api]);
  const { busy, note, error: actError, act } = useAct(reload);
  const [created, setCreated] = useState<{ name: string; key: string } | null>(null);
  const [copied, setCopied] = useState<string | null>(null);
  if (data === false) {
    return html`<h1>API keys</h1><p class="card">Only the workspace's admins manage its API keys.</p>`;
  }
  const create = async (e: Event) => {
    e.preventDefault();
    const formEl = e.target as HTMLFormElement;
    const form = new FormData(formEl);
    const ok = await act(async () => {
      const k = await api.createApiKey({ name: String(form.get("name")).trim(), role: String(form.get("role")) });
      setCreated({ name: k.name, key: k.key });
      setCopied(null);
      return null;
    });
    if (ok) formEl.reset();
  };
  const copy = async () => {
    try {
      await navigator.clipboard.writeText(created!.key);
      setCopied("Copied.");
    } catch {
      setCopied("The browser would not copy it: select the key and copy it.");
    }
  };
  return html`<h1>API keys</h1>
    ${error && html`<p class="error" role="alert">${error}</p>`}
    ${note && html`<p class="notice" role="status">${note}</p>`}
    ${actError && html`<p class="error" role="alert">${actError}</p>`}
    ${created && html`<section class="card new-key" aria-labelledby="new-key-h">
      <h2 id="new-key-h">The key “${created.name}”</h2>
      <p>Copy it now: it is not shown again.</p>
      <label>Secret<input class="mono" readOnly value=${created.key} onFocus=${(e: any) => e.target.select()} /></label>
      <p class="actions"><button onClick=${copy}>Copy</button>
        <button class="secondary" onClick=${() => setCreated(null)}>Done</button></p>
      ${copied && html`<p class="muted" role="status">${copied}</p>`}
    </section>`}
    <div class="table-wrap card">
      <table class="api-keys">
        <caption class="muted">${data ? `${data.length} key${data.length === 1 ? "" : "s"}` : "Loading…"}</caption>
        <thead><tr><th scope="col">Name</th><th scope="col">Role</th><th scope="col">Key</th><th scope="col">Created</th><th scope="col">Last used</th><th scope="col"><span class="sr-only">Actions</span></th></tr></thead>
        <tbody>
          ${data?.map((k) => html`<tr data-key=${k.id}>
            <th scope="row">${k.name}</th>
            <td>${k.role}</td>
            <td class="mono">${k.prefix}…</td>
            <td title=${k.created_at}>${ago(k.created_at)}</td>
            <td title=${k.last_used_at ?? ""}>${k.last_used_at ? ago(k.last_used_at) : "never"}</td>
            <td><button class="danger" disabled=${busy} aria-label=${`Revoke key ${k.name}`}
              onClick=${() => confirm(`Revoke the key “${k.name}”? Whatever uses it is refused from then on.`) &&
                act(async () => (await api.revokeApiKey(k.id), `The key “${k.name}” was revoked.`))}>Revoke</button></td>
          </tr>`)}
          ${data && !data.length && html`<tr><td colspan="6" class="muted">No API keys yet.</td></tr>`}
        </tbody>
      </table>
    </div>
    <form class="card admin-form" onSubmit=${create} aria-label="New API key">
      <h2>New API key</h2>
      <label>Name<input name="name" required maxLength="200" placeholder="billing cron" /></label>
      <label>Role<select name="role">${roleOptions("member")}</select></label>
      <button type="submit" disabled=${busy}>Create key</button>
    </form>`;
}
