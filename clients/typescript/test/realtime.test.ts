// subscribe against a loopback server that speaks the realtime channel as
// the API does (`ws` on node:http's upgrade), the long-polls and the stream
// route, so each test decides what the socket says, when it drops, and
// whether the upgrade is refused (as on AWS Lambda).

import assert from "node:assert/strict";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import type { Duplex } from "node:stream";
import { test, type TestContext } from "node:test";
import { WebSocket, WebSocketServer } from "ws";

import { Offload, type Job, type StreamChunk, type SubscribeOptions, type SubscriptionStatus } from "../src/index.js";

const WS = "0ff10ad0-0000-4000-8000-00000000d3e0";
const JOB = "01a2340c-dfbb-74f9-b2a8-2b1b3dbf0a3c";

/** The job at second `s` (and microsecond `us`) of 2026, with `processed` of 10 done. */
function job(status: Job["status"], processed: number, s: number, us = 0): Job {
  const t = new Date(Date.UTC(2026, 0, 1, 0, 0, s)).toISOString().replace(".000Z", `.${String(us).padStart(6, "0")}Z`);
  return {
    id: JOB,
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

const send = (socket: WebSocket, msg: unknown) => socket.send(JSON.stringify(msg));

/** One accepted connection: its request, and the messages it sent, as they come. */
interface Conn {
  socket: WebSocket;
  req: IncomingMessage;
  messages: any[];
  next(): Promise<any>;
}

/** A server for the test `t`, closed when it ends, whatever the outcome. */
async function serve(t: TestContext, opts: {
  /** A realtime connection; the first is 1. */
  onConnection?: (c: Conn, n: number) => void;
  /** Answers the upgrade with this status instead of accepting it. */
  refuseWith?: number;
  http?: (req: IncomingMessage, res: ServerResponse, n: number) => void;
}) {
  const requests: IncomingMessage[] = [];
  const upgrades: IncomingMessage[] = [];
  const server = createServer((req, res) => {
    requests.push(req);
    if (opts.http) return opts.http(req, res, requests.length);
    res.writeHead(404).end();
  });
  const wss = new WebSocketServer({ noServer: true });
  server.on("upgrade", (req: IncomingMessage, socket: Duplex, head: Buffer) => {
    upgrades.push(req);
    if (opts.refuseWith) {
      socket.end(`HTTP/1.1 ${opts.refuseWith} Refused\r\nContent-Length: 0\r\nConnection: close\r\n\r\n`);
      return;
    }
    const n = upgrades.length;
    wss.handleUpgrade(req, socket, head, (socket) => {
      const messages: any[] = [];
      const waiting: ((m: any) => void)[] = [];
      socket.on("message", (data) => {
        const m = JSON.parse(String(data));
        const w = waiting.shift();
        if (w) w(m);
        else messages.push(m);
      });
      const conn: Conn = {
        socket,
        req,
        messages,
        next: () => (messages.length ? Promise.resolve(messages.shift()) : new Promise((r) => waiting.push(r))),
      };
      opts.onConnection?.(conn, n);
    });
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const { port } = server.address() as AddressInfo;
  t.after(
    () =>
      new Promise<void>((r) => {
        for (const c of wss.clients) c.terminate();
        server.closeAllConnections();
        server.close(() => r());
      }),
  );
  const baseUrl = `http://127.0.0.1:${port}`;
  const client = new Offload({ baseUrl, workspace: WS, token: "t0ken" });
  return {
    baseUrl,
    client,
    requests,
    upgrades,
  };
}

/** Subscribes, collecting what comes; `done` resolves once the subscription is closed. */
function follow(client: Offload, options: SubscribeOptions = {}, target: string[] | { tags: string[] } = [JOB]) {
  const jobs: Job[] = [];
  const chunks: StreamChunk[] = [];
  const errors: string[] = [];
  const statuses: SubscriptionStatus[] = [];
  let closed!: () => void;
  const done = new Promise<void>((r) => (closed = r));
  const sub = client.subscribe(target, (j) => jobs.push(j), {
    WebSocket,
    untilFinished: true,
    onChunk: (c) => chunks.push(c),
    onError: (e) => errors.push(e),
    onStatus: (s) => {
      statuses.push(s);
      if (s === "closed") closed();
    },
    ...options,
  });
  return { sub, jobs, chunks, errors, statuses, done };
}

test("subscribe sends its subscription with the token, then passes on the state and each change in order", async (t) => {
  const s = await serve(t, {
    onConnection: async (c) => {
      const sub = await c.next();
      assert.deepEqual(sub, { action: "subscribe", workspace: WS, jobs: [JOB], tags: [], stream: false });
      send(c.socket, { type: "job", job: job("running", 3, 1) });
      send(c.socket, { type: "job", job: job("running", 5, 2) });
      send(c.socket, { type: "error", detail: "no job 0000 in workspace for this token" });
      send(c.socket, { type: "job", job: job("completed", 10, 3) });
    },
  });
  const f = follow(s.client);
  await f.done;
  assert.deepEqual(f.jobs.map((j) => j.progress.processed), [3, 5, 10]);
  assert.deepEqual(f.errors, ["no job 0000 in workspace for this token"], "the server's error is passed on");
  assert.deepEqual(f.statuses, ["open", "closed"], "closed once every job finished (untilFinished)");
  assert.equal(s.upgrades.length, 1);
  assert.equal(s.upgrades[0]?.url, "/api/realtime?token=t0ken");
  assert.equal(s.requests.length, 0, "no long-poll while the socket is up");
  // A realtime URL of its own (AWS's WebSocket API): the same channel, there.
  const aws = new Offload({ baseUrl: "https://jobs.invalid", realtimeUrl: `${s.baseUrl.replace("http", "ws")}/live`, workspace: WS, token: "k" });
  await follow(aws).done;
  assert.equal(s.upgrades[1]?.url, "/live?token=k");
});

test("subscribe opens again after the server drops the socket, subscribes again, and passes on nothing twice", async (t) => {
  const s = await serve(t, {
    onConnection: async (c, n) => {
      assert.equal((await c.next()).action, "subscribe", `connection ${n} subscribes`);
      if (n === 1) {
        send(c.socket, { type: "job", job: job("running", 3, 1) });
        setTimeout(() => c.socket.terminate(), 50); // dropped, with no close frame
        return;
      }
      // The state first, as the server does on each subscribe: the same one is not passed on again.
      send(c.socket, { type: "job", job: job("running", 3, 1) });
      send(c.socket, { type: "job", job: job("running", 7, 2) });
      send(c.socket, { type: "job", job: job("completed", 10, 3) });
    },
  });
  let tokens = 0;
  const client = new Offload({
    baseUrl: s.baseUrl,
    workspace: WS,
    token: () => `t${++tokens}`,
  });
  const started = Date.now();
  const f = follow(client);
  await f.done;
  assert.deepEqual(f.jobs.map((j) => j.progress.processed), [3, 7, 10]);
  assert.equal(s.upgrades.length, 2);
  assert.deepEqual(s.upgrades.map((u) => u.url), ["/api/realtime?token=t1", "/api/realtime?token=t2"], "a token got at each connect");
  assert.deepEqual(f.statuses, ["open", "connecting", "open", "closed"]);
  const waited = Date.now() - started;
  assert.ok(waited >= 250 && waited < 3000, `reconnected after a backoff of 0.25 to 0.5 s, took ${waited} ms`);
});

test("subscribe drops a state older than one passed on, to the microsecond", async (t) => {
  const s = await serve(t, {
    onConnection: async (c) => {
      await c.next();
      send(c.socket, { type: "job", job: job("running", 5, 2, 500) });
      send(c.socket, { type: "job", job: job("running", 4, 2, 499) }); // older by a microsecond
      send(c.socket, { type: "job", job: job("running", 5, 2, 500) }); // the same again
      send(c.socket, { type: "job", job: job("running", 6, 2, 501) }); // newer by one
      send(c.socket, { type: "job", job: job("running", 2, 1) }); // a second older
      send(c.socket, { type: "job", job: job("completed", 10, 3) });
    },
  });
  const f = follow(s.client);
  await f.done;
  assert.deepEqual(f.jobs.map((j) => j.progress.processed), [5, 6, 10]);
});

test("subscribe falls back to long-polls when the upgrade is refused several times in a row", async (t) => {
  const s = await serve(t, {
    refuseWith: 426,
    http: (req, res, n) => {
      assert.match(req.url ?? "", new RegExp(`/api/workspaces/${WS}/jobs/${JOB}`));
      res.writeHead(200, { "Content-Type": "application/json", ETag: `"${n}"` });
      res.end(JSON.stringify(n === 1 ? job("running", 4, 1) : job("completed", 10, 2)));
    },
  });
  const f = follow(s.client);
  await f.done;
  assert.equal(s.upgrades.length, 3, "three refusals, then no more tries");
  assert.deepEqual(f.statuses, ["polling", "closed"]);
  assert.deepEqual(f.jobs.map((j) => j.status), ["running", "completed"]);
  assert.match(s.requests[1]?.url ?? "", /wait=25/, "then a long-poll");
  assert.equal(s.requests[1]?.headers["if-none-match"], '"1"');
  const again = follow(s.client);
  await again.done;
  assert.deepEqual(again.statuses, ["polling", "closed"], "the next subscription of the client polls at once");
  assert.equal(s.upgrades.length, 3, "with no upgrade tried");
});

test("without a WebSocket class jobs are long-polled at once, and tags are refused through onError", async (t) => {
  const s = await serve(t, {
    http: (_req, res) => {
      res.writeHead(200, { "Content-Type": "application/json", ETag: '"z"' });
      res.end(JSON.stringify(job("completed", 10, 1)));
    },
  });
  const byId = follow(s.client, { WebSocket: undefined });
  await byId.done;
  assert.deepEqual(byId.jobs.map((j) => j.status), ["completed"]);
  assert.deepEqual(byId.statuses, ["polling", "closed"]);
  const byTag = follow(s.client, { WebSocket: undefined }, { tags: ["import"] });
  await byTag.done;
  assert.equal(byTag.errors.length, 1);
  assert.match(byTag.errors[0] ?? "", /tags needs the realtime channel/);
  assert.equal(s.upgrades.length, 0);
});

test("a stream from the start: the backlog from the stream route, then the socket's chunks, each once and in order", async (t) => {
  const streamReads: string[] = [];
  const s = await serve(t, {
    onConnection: async (c) => {
      assert.deepEqual(await c.next(), { action: "subscribe", workspace: WS, jobs: [JOB], tags: [], stream: true });
      // A chunk may come before the state: it is held until the backlog is read.
      send(c.socket, { type: "chunk", job_id: JOB, cursor: "12", data: { line: 12 } });
      send(c.socket, { type: "job", job: job("running", 3, 1) });
      setTimeout(() => send(c.socket, { type: "chunk", job_id: JOB, cursor: "13", data: { line: 13 } }), 100);
      setTimeout(() => send(c.socket, { type: "job", job: job("completed", 10, 2) }), 150);
    },
    http: (req, res) => {
      streamReads.push(req.url ?? "");
      assert.equal(req.headers.authorization, "Bearer t0ken");
      res.writeHead(200, { "Content-Type": "text/event-stream" });
      if (req.url?.endsWith("cursor=13")) {
        // The job has finished: nothing after 13, and the end.
        return res.end('event: end\ndata: {"status":"completed"}\n\n');
      }
      // The backlog, split mid-line and with CRLFs, then chunk 12 again (the
      // route's feed), then silence: the read stops at the held chunk.
      res.write("retry: 1000\n: offload\n\nevent: chunk\r\nid: 10\r");
      res.write('\ndata: {"line":10}\r\n\r\nevent: chunk\nid: 11\ndata: {"line":11}\n\n');
      setTimeout(() => res.write('event: chunk\nid: 12\ndata: {"line":12}\n\n'), 30);
    },
  });
  const f = follow(s.client, { stream: true, streamFrom: "start" });
  await f.done;
  assert.deepEqual(f.chunks.map((c) => c.cursor), ["10", "11", "12", "13"]);
  assert.deepEqual(f.chunks[0], { job_id: JOB, cursor: "10", data: { line: 10 } });
  assert.equal(streamReads[0], `/api/workspaces/${WS}/jobs/${JOB}/stream`, "the backlog from the start");
  assert.equal(streamReads[1], `/api/workspaces/${WS}/jobs/${JOB}/stream?cursor=13`, "the rest, after the job finished");
  assert.deepEqual(f.jobs.map((j) => j.status), ["running", "completed"]);
});

test("a stream from now passes on the socket's chunks as they come, and close() ends the connection", async (t) => {
  let closedByClient!: () => void;
  const serverSawClose = new Promise<void>((r) => (closedByClient = r));
  const s = await serve(t, {
    onConnection: async (c) => {
      await c.next();
      c.socket.on("close", (code) => {
        assert.equal(code, 1000);
        closedByClient();
      });
      send(c.socket, { type: "job", job: job("running", 3, 1) });
      send(c.socket, { type: "chunk", job_id: JOB, cursor: "40", data: "a" });
      send(c.socket, { type: "chunk", job_id: JOB, cursor: "41", data: "b" });
    },
  });
  const abort = new AbortController();
  const f = follow(s.client, { stream: true, untilFinished: false, signal: abort.signal });
  while (f.chunks.length < 2) await new Promise((r) => setTimeout(r, 10));
  abort.abort();
  await f.done;
  await serverSawClose;
  assert.deepEqual(f.chunks.map((c) => c.data), ["a", "b"]);
  assert.equal(f.sub.status, "closed");
  assert.equal(s.requests.length, 0, "no stream read: only chunks from now were asked for");
});
