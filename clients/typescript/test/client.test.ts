// The client against a loopback HTTP server that answers as the API does
// (ETags, 304, long-poll `wait`, cursors), so the network can be made to
// fail exactly where a test needs it. The dashboard's browser tests run
// the same client against the real API.

import assert from "node:assert/strict";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { test } from "node:test";

import { Offload, OffloadError, type Job } from "../src/index.js";

const WS = "0ff10ad0-0000-4000-8000-00000000d3e0";
const JOB = "01a2340c-dfbb-74f9-b2a8-2b1b3dbf0a3c";

function job(status: Job["status"], processed: number, i = 0): Job {
  const t = new Date(Date.UTC(2026, 0, 1, 0, 0, i)).toISOString();
  return {
    id: i ? `00000000-0000-4000-8000-${String(i).padStart(12, "0")}` : JOB,
    workspace_id: WS,
    type: "sleep",
    queue: "default",
    priority: 0,
    status,
    payload: {},
    attempts: 1,
    max_attempts: 3,
    run_at: t,
    progress: { total: 10, processed, failed: 0, percentage: processed * 10, stage: null, message: null },
    result: null,
    error_message: null,
    error_kind: null,
    tags: [],
    created_at: t,
    started_at: t,
    finished_at: status === "completed" ? t : null,
    updated_at: t,
  };
}

type Handler = (req: IncomingMessage, res: ServerResponse, n: number) => void;

async function serve(handler: Handler) {
  const seen: IncomingMessage[] = [];
  const server = createServer((req, res) => {
    seen.push(req);
    handler(req, res, seen.length);
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const { port } = server.address() as AddressInfo;
  const client = new Offload({ baseUrl: `http://127.0.0.1:${port}`, workspace: WS, token: "t0ken" });
  return {
    client,
    seen,
    close: () =>
      new Promise<void>((r) => {
        server.closeAllConnections();
        server.close(() => r());
      }),
  };
}

function json(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}) {
  res.writeHead(status, { "Content-Type": "application/json", ...headers });
  res.end(JSON.stringify(body));
}

test("watchJob resumes after a dropped connection from the last ETag, missing and repeating nothing", async () => {
  const s = await serve((req, res, n) => {
    if (n === 1) return json(res, 200, job("running", 3), { ETag: '"a"' });
    if (n === 2) return req.socket.destroy(); // the connection drops mid-poll
    if (n === 3) {
      res.writeHead(304, { ETag: '"a"' }); // nothing changed within the wait
      return res.end();
    }
    return json(res, 200, job("completed", 10), { ETag: '"b"' });
  });
  const updates: number[] = [];
  const retries: unknown[] = [];
  const done = await s.client.watchJob(JOB, (u) => updates.push(u.job.progress.processed), {
    waitSeconds: 1,
    onRetry: (e) => retries.push(e),
  });
  assert.equal(done.status, "completed");
  assert.deepEqual(updates, [3, 10], "each change once, in order");
  assert.equal(retries.length, 1, "the dropped connection was retried once");
  assert.equal(s.seen[0]?.headers["if-none-match"], undefined);
  assert.doesNotMatch(s.seen[0]?.url ?? "", /wait=/, "the first read answers at once");
  for (const req of s.seen.slice(1)) {
    assert.equal(req.headers["if-none-match"], '"a"', "polls after the first resume from its ETag");
    assert.match(req.url ?? "", /wait=1/);
    assert.equal(req.headers.authorization, "Bearer t0ken");
  }
  await s.close();
});

test("watchJob stops when its signal aborts, even mid-poll", async () => {
  const s = await serve(() => {
    /* never answers: a long-poll that is still waiting */
  });
  const abort = new AbortController();
  const watching = s.client.watchJob(JOB, () => assert.fail("no update was sent"), {
    signal: abort.signal,
  });
  setTimeout(() => abort.abort(new Error("left the page")), 50);
  await assert.rejects(watching, /left the page/);
  await s.close();
});

test("watchJob gives up on an answer no retry mends, with the problem body", async () => {
  const s = await serve((_req, res) =>
    json(res, 401, { type: "https://offload.dev/problems/unauthorized", title: "Unauthorized", status: 401, detail: "the token has expired" }),
  );
  await assert.rejects(
    s.client.watchJob(JOB, () => {}),
    (e: unknown) => e instanceof OffloadError && e.status === 401 && e.message === "the token has expired",
  );
  assert.equal(s.seen.length, 1, "a 401 is not retried");
  await s.close();
});

test("listJobs follows the cursors and ends after the last page", async () => {
  const all = [5, 4, 3, 2, 1].map((i) => job("completed", 10, i));
  const s = await serve((req, res) => {
    const url = new URL(req.url ?? "", "http://x");
    const limit = Number(url.searchParams.get("limit"));
    const cursor = url.searchParams.get("cursor");
    const start = cursor ? all.findIndex((j) => j.id === cursor) + 1 : 0;
    const jobs = all.slice(start, start + limit);
    const more = start + limit < all.length;
    json(res, 200, { jobs, next_cursor: more ? jobs[jobs.length - 1]?.id : null });
  });
  const ids: string[] = [];
  for await (const j of s.client.listJobs({ status: "completed", limit: 2 })) ids.push(j.id);
  assert.deepEqual(ids, all.map((j) => j.id));
  assert.equal(s.seen.length, 3, "three pages, then no fourth request");
  assert.match(s.seen[0]?.url ?? "", /status=completed/);
  await s.close();
});

test("errors carry the field the API named", async () => {
  const s = await serve((_req, res) =>
    json(res, 422, { type: "https://offload.dev/problems/validation-failed", title: "Validation failed", status: 422, detail: "must be from 0 to 600000", field: "payload.ms" }),
  );
  await assert.rejects(
    s.client.createJob({ type: "sleep", payload: { ms: -1 } }),
    (e: unknown) => e instanceof OffloadError && e.status === 422 && e.field === "payload.ms",
  );
  await s.close();
});
