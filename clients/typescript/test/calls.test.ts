// The calls of the workspace and the platform routes against a loopback
// server that records each request and answers as the API does: each call
// sends the right method, path, headers and body, and returns what the
// answer holds.

import assert from "node:assert/strict";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { test, type TestContext } from "node:test";

import { Offload, OffloadError, OffloadPlatform } from "../src/index.js";

const WS = "0ff10ad0-0000-4000-8000-00000000d3e0";
const JOB = "01a2340c-dfbb-74f9-b2a8-2b1b3dbf0a3c";
const ID = "7a1b0000-0000-4000-8000-000000000001";
const AT = "2026-01-01T00:00:00Z";

interface Seen {
  method: string;
  url: string;
  authorization: string | undefined;
  body: unknown;
}

type Answer = [number, unknown?, Record<string, string>?];

/** A server answering each request with `answer(request)`; every request is in `seen`. */
async function serve(t: TestContext, answer: (req: Seen) => Answer) {
  const seen: Seen[] = [];
  const server = createServer(async (req: IncomingMessage, res: ServerResponse) => {
    let text = "";
    for await (const part of req) text += part;
    const s: Seen = {
      method: req.method ?? "",
      url: req.url ?? "",
      authorization: req.headers.authorization,
      body: text ? JSON.parse(text) : undefined,
    };
    seen.push(s);
    const [status, body, headers] = answer(s);
    if (body === undefined) return res.writeHead(status, headers).end();
    const type = status >= 400 ? "application/problem+json" : "application/json";
    res.writeHead(status, { "Content-Type": type, ...headers }).end(JSON.stringify(body));
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  t.after(
    () =>
      new Promise<void>((r) => {
        server.closeAllConnections();
        server.close(() => r());
      }),
  );
  return { baseUrl: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, seen };
}

const member = { id: ID, subject: "auth0|someone", issuer: null, role: "member", created_at: AT };
const key = { id: ID, name: "billing cron", role: "member", prefix: "ofk_ab12", created_at: AT, last_used_at: null };
const workspace = { id: WS, name: "Acme", tier: "standard", external_id: "org_1", limits: {}, created_at: AT };
const page = { jobs: [], next_cursor: null };

test("the workspace calls send the method, path and body the API expects", async (t) => {
  const s = await serve(t, ({ method, url }) => {
    const path = url.split("?")[0];
    if (path?.endsWith("/browser-tokens")) return [201, { token: "ofb_x", expires_at: AT }];
    if (path?.endsWith("/children")) return [200, page];
    if (path?.endsWith("/complete")) return [200, { token: "wt_1", job_id: JOB, completed_at: AT }];
    if (path?.endsWith("/members") && method === "GET") return [200, { members: [member] }];
    if (path?.endsWith("/members")) return [201, member];
    if (path?.endsWith("/api-keys") && method === "GET") return [200, { api_keys: [key] }];
    if (path?.endsWith("/api-keys")) return [201, { ...key, key: "ofk_secret" }];
    if (method === "DELETE") return [204];
    return [404, { type: "about:blank", title: "Not found", status: 404, detail: `no route ${url}` }];
  });
  const c = new Offload({ baseUrl: s.baseUrl, workspace: WS, token: "t0ken" });
  const base = `/api/workspaces/${WS}`;

  assert.deepEqual(await c.createBrowserToken({ jobs: [JOB], scopes: ["read", "cancel"], ttl_s: 600 }), {
    token: "ofb_x",
    expires_at: AT,
  });
  assert.deepEqual(await c.children(JOB, { cursor: "abc", limit: 20 }), page);
  assert.equal((await c.completeToken("wt_1", { approved: true })).job_id, JOB);
  assert.deepEqual(await c.listMembers(), [member]);
  assert.deepEqual(await c.addMember({ subject: "auth0|someone", role: "admin" }), member);
  assert.equal(await c.removeMember(ID), undefined);
  assert.deepEqual(await c.listApiKeys(), [key]);
  assert.equal((await c.createApiKey({ name: "billing cron", role: "member" })).key, "ofk_secret");
  assert.equal(await c.revokeApiKey(ID), undefined);

  assert.deepEqual(
    s.seen.map(({ method, url, body }) => [method, url, body]),
    [
      ["POST", `${base}/browser-tokens`, { jobs: [JOB], scopes: ["read", "cancel"], ttl_s: 600 }],
      ["GET", `${base}/jobs/${JOB}/children?cursor=abc&limit=20`, undefined],
      ["POST", `${base}/tokens/wt_1/complete`, { data: { approved: true } }],
      ["GET", `${base}/members`, undefined],
      ["POST", `${base}/members`, { subject: "auth0|someone", role: "admin" }],
      ["DELETE", `${base}/members/${ID}`, undefined],
      ["GET", `${base}/api-keys`, undefined],
      ["POST", `${base}/api-keys`, { name: "billing cron", role: "member" }],
      ["DELETE", `${base}/api-keys/${ID}`, undefined],
    ],
  );
  assert.ok(s.seen.every((r) => r.authorization === "Bearer t0ken"));
});

test("a refused call is an OffloadError with the problem's detail", async (t) => {
  const s = await serve(t, () => [
    403,
    { type: "https://offload.dev/problems/forbidden", title: "Forbidden", status: 403, detail: "only admins manage members" },
  ]);
  const c = new Offload({ baseUrl: s.baseUrl, workspace: WS, token: "t0ken" });
  for (const call of [() => c.listMembers(), () => c.removeMember(ID), () => c.revokeApiKey(ID)]) {
    await assert.rejects(
      call(),
      (e: unknown) => e instanceof OffloadError && e.status === 403 && e.message === "only admins manage members",
    );
  }
});

test("the platform calls send the platform key, and the method, path and body the API expects", async (t) => {
  const s = await serve(t, ({ method, url }) => {
    if (url === "/api/workspaces?external_id=org_404") return [200, { workspaces: [], next_cursor: null }];
    if (url.startsWith("/api/workspaces?")) return [200, { workspaces: [workspace], next_cursor: null }];
    if (url === "/api/workspaces") return [201, workspace];
    if (url.endsWith("/members") && method === "GET") return [200, { members: [member] }];
    if (url.endsWith("/members")) return [200, member];
    if (method === "DELETE" && url.includes("/members/")) return [204];
    if (method === "DELETE") return [202, { workspace: { ...workspace, deleting_at: AT }, job: { id: JOB } }];
    return [200, workspace];
  });
  const p = new OffloadPlatform({ baseUrl: s.baseUrl, platformKey: () => "ofp_k3y" });
  assert.deepEqual(await p.createWorkspace({ name: "Acme", external_id: "org_1", tier: "standard" }), workspace);
  assert.deepEqual(await p.findWorkspace("org_1"), workspace);
  assert.equal(await p.findWorkspace("org_404"), null);
  assert.deepEqual(await p.getWorkspace(WS), workspace);
  assert.deepEqual(await p.updateWorkspace(WS, { limits: { max_running: 5 } }), workspace);
  assert.equal((await p.deleteWorkspace(WS)).workspace.deleting_at, AT);
  assert.deepEqual(await p.addMember(WS, { subject: "user_2ab", issuer: "https://clerk.example", role: "member" }), member);
  assert.deepEqual(await p.listMembers(WS), [member]);
  assert.equal(await p.removeMember(WS, ID), undefined);

  const ws = `/api/workspaces/${WS}`;
  assert.deepEqual(
    s.seen.map(({ method, url, body }) => [method, url, body]),
    [
      ["POST", "/api/workspaces", { name: "Acme", external_id: "org_1", tier: "standard" }],
      ["GET", "/api/workspaces?external_id=org_1", undefined],
      ["GET", "/api/workspaces?external_id=org_404", undefined],
      ["GET", ws, undefined],
      ["PATCH", ws, { limits: { max_running: 5 } }],
      ["DELETE", ws, undefined],
      ["POST", `${ws}/members`, { subject: "user_2ab", issuer: "https://clerk.example", role: "member" }],
      ["GET", `${ws}/members`, undefined],
      ["DELETE", `${ws}/members/${ID}`, undefined],
    ],
  );
  assert.ok(s.seen.every((r) => r.authorization === "Bearer ofp_k3y"));
});

test("readStream passes on a response's chunks, in order, and ends at the job's end", async (t) => {
  const urls: string[] = [];
  const server = createServer((req, res) => {
    urls.push(req.url ?? "");
    res.writeHead(200, { "Content-Type": "text/event-stream" });
    res.write(': offload\n\nevent: chunk\nid: 7\ndata: {"text":"a\\nb"}\n\n');
    res.write("event: chunk\nid: 9\ndata: [1,\ndata: 2]\n\n");
    res.end('event: end\ndata: {"status":"completed"}\n\n');
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  t.after(() => new Promise<void>((r) => server.close(() => r())));
  const c = new Offload({
    baseUrl: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    workspace: WS,
    token: "t0ken",
  });
  const events = [];
  for await (const ev of c.readStream(JOB, { cursor: "5" })) events.push(ev);
  assert.deepEqual(events, [
    { type: "chunk", job_id: JOB, cursor: "7", data: { text: "a\nb" } },
    { type: "chunk", job_id: JOB, cursor: "9", data: [1, 2] },
    { type: "end", job_id: JOB, status: "completed" },
  ]);
  assert.deepEqual(urls, [`/api/workspaces/${WS}/jobs/${JOB}/stream?cursor=5`]);
});
