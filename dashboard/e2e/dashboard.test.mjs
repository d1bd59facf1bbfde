// The dashboard in a real headless browser (Debian's Chromium driven by
// playwright-core) against a real `offload dev` and its PostgreSQL, started
// by scripts/e2e.sh, which passes OFFLOAD_URL, OFFLOAD_WORKSPACE,
// OFFLOAD_TOKEN, OFFLOAD_EXPIRING_TOKEN and SCREENSHOTS. Each screen is
// saved as a PNG under SCREENSHOTS.

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createServer } from "node:http";
import { mkdirSync } from "node:fs";
import { after, before, test } from "node:test";
import { chromium } from "playwright-core";

const URL_ = process.env.OFFLOAD_URL;
const WS = process.env.OFFLOAD_WORKSPACE;
const TOKEN = process.env.OFFLOAD_TOKEN;
const SHOTS = process.env.SCREENSHOTS ?? "test-output/dashboard";
assert.ok(URL_ && WS && TOKEN, "run through scripts/e2e.sh");
mkdirSync(SHOTS, { recursive: true });

let browser, page;
const cspErrors = [];
/** What the page said and what failed to load, printed when a test fails. */
const pageLog = [];

async function api(method, path, body) {
  const resp = await fetch(`${URL_}/api/workspaces/${WS}${path}`, {
    method,
    headers: { Authorization: `Bearer ${TOKEN}`, "Content-Type": "application/json" },
    body: body && JSON.stringify(body),
  });
  assert.ok(resp.ok, `${method} ${path}: ${resp.status} ${await resp.clone().text()}`);
  return resp.status === 204 ? null : resp.json();
}

/** Waits (up to 10 s) until the API says the job is in `status`. */
async function untilStatus(id, status) {
  for (let i = 0; i < 100 && (await api("GET", `/jobs/${id}`)).status !== status; i++) {
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Presses Tab until the focused element's label or text matches, then returns; no mouse. */
async function tabTo(pattern) {
  for (let i = 0; i < 80; i++) {
    await page.keyboard.press("Tab");
    const label = await page.evaluate(() => {
      const el = document.activeElement;
      if (!el) return "";
      const label = el.getAttribute("aria-label") ?? el.labels?.[0]?.textContent ?? el.textContent ?? "";
      return label.trim();
    });
    if (pattern.test(label)) return;
  }
  assert.fail(`no focusable element matching ${pattern} within 80 tabs`);
}

/**
 * Appends a chunk to a job's stream as a handler's `ctx.stream` does, and
 * notifies its watchers as that statement does: no job type `offload dev`
 * runs writes a stream. The database is scripts/e2e.sh's `offload_e2e`, on
 * the server of the DATABASE_URL it exports.
 */
function appendStream(jobId, text) {
  assert.ok(process.env.DATABASE_URL, "run through scripts/e2e.sh (DATABASE_URL)");
  const db = `${process.env.DATABASE_URL.replace(/\/[^/]*$/, "")}/offload_e2e`;
  execFileSync("psql", [db, "-qAt", "-v", "ON_ERROR_STOP=1", "-v", `job=${jobId}`, "-v", `ws=${WS}`, "-v", `text=${text}`], {
    input:
      "INSERT INTO job_stream (job_id, workspace_id, data, created_at) " +
      "VALUES (:'job', :'ws', jsonb_build_object('line', :'text'::text), now());\n" +
      "SELECT pg_notify('offload_jobs', :'job');\n",
  });
}

/** Runs `fn` with the dashboard signed in with `token`, then signs back in as before. */
async function signedInAs(token, fn) {
  const saved = await page.evaluate(() => sessionStorage.getItem("offload.session"));
  await page.evaluate((s) => sessionStorage.setItem("offload.session", s), JSON.stringify({ workspace: WS, token }));
  try {
    await fn();
  } finally {
    await page.evaluate((s) => sessionStorage.setItem("offload.session", s), saved);
    await page.goto(`${URL_}/#/`);
    await page.reload();
  }
}

const shot = (name) => page.screenshot({ path: `${SHOTS}/${name}.png`, fullPage: true });

/**
 * A browser test: on failure, prints the page's address, its console and
 * failed requests, and the start of its HTML, then saves a screenshot, so
 * a failure on a machine nobody can look at says what the browser saw.
 */
function browserTest(name, fn) {
  test(name, async () => {
    pageLog.length = 0;
    try {
      await fn();
    } catch (err) {
      const html = await page.content().catch((e) => `(no content: ${e.message})`);
      console.error(
        `--- ${name}: the browser at ${page.url()}\n${pageLog.join("\n") || "(nothing logged)"}\n` +
          `--- HTML (first 1500 characters)\n${html.slice(0, 1500)}\n---`,
      );
      const file = `failed-${name.replace(/[^a-z0-9]+/gi, "-").slice(0, 60)}`;
      await shot(file).catch(() => {});
      throw err;
    }
  });
}

before(async () => {
  // The flags keep Chromium off the network it would reach at start-up (updates, sync,
  // safe browsing): on a closed network those connections are refused or hang.
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-dev-shm-usage",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
    timeout: 60_000,
  });
  page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.setDefaultTimeout(15_000);
  page.on("console", (m) => {
    if (/Content[- ]Security[- ]Policy/i.test(m.text())) cspErrors.push(m.text());
    pageLog.push(`console.${m.type()}: ${m.text()}`);
  });
  page.on("pageerror", (e) => pageLog.push(`page error: ${e.stack ?? e.message}`));
  page.on("requestfailed", (r) => pageLog.push(`request failed: ${r.method()} ${r.url()}: ${r.failure()?.errorText}`));
  page.on("response", (r) => {
    if (r.status() >= 400) pageLog.push(`response ${r.status()}: ${r.request().method()} ${r.url()}`);
  });
  page.on("crash", () => pageLog.push("the page crashed"));
  page.on("dialog", (d) => d.accept());
});

after(async () => {
  // A browser that does not close must not hold the run: give it 10 s, then kill it.
  const closing = browser?.close();
  const timedOut = await Promise.race([
    closing?.then(() => false),
    new Promise((r) => setTimeout(() => r(true), 10_000).unref()),
  ]);
  if (timedOut) browser?.process?.()?.kill("SIGKILL");
});

browserTest("the page is served with a strict CSP and signs in with the keyboard only", async () => {
  const resp = await page.goto(`${URL_}/`);
  assert.equal(resp.status(), 200, `GET / answered ${resp.status()}: ${await resp.text()}`);
  assert.match(resp.headers()["content-type"] ?? "", /^text\/html/);
  const csp = resp.headers()["content-security-policy"];
  assert.match(csp, /script-src 'self'/);
  assert.doesNotMatch(csp, /unsafe-inline/);
  await page.getByRole("heading", { name: "Sign in" }).waitFor();
  await shot("signin");
  await page.keyboard.press("Tab");
  await page.keyboard.type(WS);
  await page.keyboard.press("Tab");
  await page.keyboard.type(TOKEN);
  await page.keyboard.press("Tab");
  await page.keyboard.press("Enter");
  await page.getByRole("heading", { name: "Overview" }).waitFor();
  const stored = await page.evaluate(() => [sessionStorage.length, localStorage.length]);
  assert.deepEqual(stored, [2, 0], "the token is kept in session storage only");
});

browserTest("a running job's progress bar moves to 100 %", async () => {
  const job = await api("POST", "/jobs", { type: "sleep", payload: { ms: 4000, steps: 8 } });
  await page.goto(`${URL_}/#/jobs/${job.id}`);
  const bar = page.getByRole("progressbar", { name: "Job progress" });
  await bar.waitFor();
  const seen = new Set();
  for (let i = 0; i < 200; i++) {
    const v = await bar.getAttribute("value");
    if (v !== null) seen.add(Number(v));
    if (Number(v) === 100) break;
    await page.waitForTimeout(50);
  }
  assert.ok([...seen].some((v) => v > 0 && v < 100), `saw it move: ${[...seen]}`);
  assert.ok(seen.has(100), `reached 100: ${[...seen]}`);
  await page.locator(".badge", { hasText: "completed" }).first().waitFor();
  await page.getByText("8 of 8 processed").waitFor();
  await shot("job-detail");
});

browserTest("cancelling a running job shows cancelled and its partial result", async () => {
  const job = await api("POST", "/jobs", { type: "sleep", payload: { ms: 30000, steps: 60 } });
  await page.goto(`${URL_}/#/jobs/${job.id}`);
  await page.locator(".badge", { hasText: "running" }).first().waitFor({ timeout: 10_000 });
  await page.getByRole("button", { name: `Cancel job ${job.id}` }).click();
  await page.locator(".badge", { hasText: "cancelled" }).first().waitFor({ timeout: 15_000 });
  await page.locator(".json", { hasText: "steps_done" }).waitFor();
  const done = (await api("GET", `/jobs/${job.id}`)).result.steps_done;
  assert.ok(done > 0 && done < 60, `partial: ${done}`);
});

browserTest("a job that failed permanently is found in dead jobs, retried, and completes", async () => {
  let calls = 0;
  const receiver = createServer((req, res) => {
    calls += 1;
    res.writeHead(calls === 1 ? 400 : 200, { "Content-Type": "application/json" });
    res.end(calls === 1 ? '{"error":"not yet"}' : '{"ok":true}');
  });
  await new Promise((r) => receiver.listen(0, "127.0.0.1", r));
  // A listening receiver keeps the test process alive: it is closed however the test ends.
  try {
    const url = `http://127.0.0.1:${receiver.address().port}/hook`;
    const job = await api("POST", "/jobs", { type: "webhook", payload: { url, body: { n: 1 } } });
    await untilStatus(job.id, "dead");
    await page.goto(`${URL_}/#/dead`);
    const row = page.locator(`tr[data-job="${job.id}"]`);
    await row.waitFor();
    await page.getByLabel("Error contains").fill("400");
    await row.waitFor();
    await shot("dead-jobs");
    await row.getByRole("button", { name: `Retry job ${job.id}` }).click();
    await page.getByRole("status").filter({ hasText: "1 job sent to run again" }).waitFor();
    await page.goto(`${URL_}/#/jobs/${job.id}`);
    await page.locator(".badge", { hasText: "completed" }).first().waitFor({ timeout: 15_000 });
    assert.equal(calls, 2);
  } finally {
    receiver.closeAllConnections();
    receiver.close();
  }
});

browserTest("a job is found and cancelled with the keyboard only", async () => {
  const job = await api("POST", "/jobs", { type: "sleep", payload: { ms: 30000, steps: 60 }, tags: ["e2e-keys"] });
  await page.goto(`${URL_}/#/`);
  await page.getByRole("heading", { name: "Overview" }).waitFor();
  await tabTo(/^Jobs$/);
  await page.keyboard.press("Enter");
  await page.getByRole("heading", { name: "Jobs" }).waitFor();
  await tabTo(/^Tag/);
  await page.keyboard.type("e2e-keys");
  await page.keyboard.press("Enter");
  await page.waitForFunction(() => location.hash.includes("tag=e2e-keys"));
  await page.locator(`tr[data-job="${job.id}"]`).waitFor();
  await tabTo(new RegExp(`Cancel job ${job.id}`));
  await page.keyboard.press("Enter");
  await untilStatus(job.id, "cancelled");
  assert.equal((await api("GET", `/jobs/${job.id}`)).status, "cancelled");
});

browserTest("the jobs table filters by status and tag, and fits a phone", async () => {
  const red = await api("POST", "/jobs/batch", {
    jobs: [1, 2, 3].map(() => ({ type: "noop", tags: ["e2e-red"] })),
  });
  await api("POST", "/jobs/batch", { jobs: [1, 2].map(() => ({ type: "noop", tags: ["e2e-blue"] })) });
  for (const j of red.jobs) await untilStatus(j.id, "completed");
  await page.goto(`${URL_}/#/jobs`);
  await page.getByLabel("Status").selectOption("completed");
  await page.getByLabel("Tag").fill("e2e-red");
  await page.getByRole("button", { name: "Apply" }).click();
  await page.waitForFunction(() => location.hash.includes("status=completed") && location.hash.includes("tag=e2e-red"));
  const rows = page.locator("table.jobs tbody tr[data-job]");
  await page.waitForFunction(() => document.querySelectorAll("table.jobs tbody tr[data-job]").length === 3);
  const ids = await rows.evaluateAll((trs) => trs.map((tr) => tr.dataset.job));
  assert.deepEqual(ids.sort(), red.jobs.map((j) => j.id).sort());
  await shot("jobs");
  await page.setViewportSize({ width: 390, height: 844 });
  await page.waitForTimeout(200);
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - innerWidth);
  assert.ok(overflow <= 0, `the page scrolls sideways by ${overflow}px on a phone`);
  await shot("jobs-phone");
  await page.goto(`${URL_}/#/`);
  await page.getByText("Completed, last hour").waitFor();
  await shot("overview-phone");
  await page.setViewportSize({ width: 1280, height: 900 });
  await page.reload();
  await page.getByText("Completed, last hour").waitFor();
  await page.waitForTimeout(500);
  await shot("overview");
});

browserTest("a schedule is created with its next run in its time zone, then deleted", async () => {
  await page.goto(`${URL_}/#/schedules`);
  await page.getByLabel("Name").fill("nightly e2e");
  await page.getByLabel("Cron (minute hour day month weekday)").fill("0 2 * * *");
  await page.getByLabel("Time zone").fill("Asia/Tokyo");
  await page.getByLabel("Job type").fill("noop");
  await page.getByRole("button", { name: "Create schedule" }).click();
  const row = page.locator("tr", { hasText: "nightly e2e" });
  await row.waitFor();
  const text = await row.innerText();
  assert.match(text, /GMT\+9|JST/, `next run shown in Tokyo time: ${text}`);
  await row.getByText("then").click();
  assert.equal(await row.locator("ul.plain li").count(), 4, "the four runs after the next");
  await shot("schedules");
  await row.getByRole("button", { name: "Delete schedule nightly e2e" }).click();
  await row.waitFor({ state: "detached" });
  assert.deepEqual((await api("GET", "/schedules")).schedules, []);
});

browserTest("a job page follows its job over the WebSocket: progress, and its stream, live without a reload", async () => {
  const job = await api("POST", "/jobs", { type: "sleep", payload: { ms: 6000, steps: 12 } });
  await untilStatus(job.id, "running");
  appendStream(job.id, "written before the page opened");
  const sockets = [];
  const polls = [];
  const onSocket = (ws) => {
    const s = { url: ws.url(), frames: [] };
    ws.on("framereceived", (f) => s.frames.push(String(f.payload)));
    sockets.push(s);
  };
  const onRequest = (r) => {
    if (r.url().includes(`/jobs/${job.id}`) && !/\/(logs|stream)\b/.test(r.url())) polls.push(r.url());
  };
  page.on("websocket", onSocket);
  page.on("request", onRequest);
  try {
    await page.goto(`${URL_}/#/jobs/${job.id}`);
    await page.evaluate(() => (window.e2eSameDocument = true));
    await page.locator(".live-open", { hasText: "live" }).waitFor();
    const lines = page.locator("ol.stream li");
    await lines.first().waitFor();
    appendStream(job.id, "written while the page watched");
    await page.waitForFunction(() => document.querySelectorAll("ol.stream li").length === 2);
    const bar = page.getByRole("progressbar", { name: "Job progress" });
    const seen = new Set();
    for (let i = 0; i < 300 && !seen.has(100); i++) {
      const v = await bar.getAttribute("value");
      if (v !== null) seen.add(Number(v));
      await page.waitForTimeout(40);
    }
    assert.ok([...seen].some((v) => v > 0 && v < 100), `saw it move: ${[...seen]}`);
    await page.locator(".badge", { hasText: "completed" }).first().waitFor();
    await page.getByText("12 of 12 processed").waitFor();
    assert.deepEqual(await lines.allInnerTexts(), [
      '{"line":"written before the page opened"}',
      '{"line":"written while the page watched"}',
    ]);
    assert.equal(await page.evaluate(() => window.e2eSameDocument), true, "the page was not reloaded");
    const realtime = sockets.filter((s) => s.url.startsWith(`${URL_.replace(/^http/, "ws")}/api/realtime?token=`));
    assert.equal(realtime.length, 1, `one WebSocket to /api/realtime: ${sockets.map((s) => s.url.split("?")[0])}`);
    const frames = realtime[0].frames.map((f) => JSON.parse(f));
    assert.ok(frames.some((f) => f.type === "job" && f.job.status === "completed"), "the final state came over it");
    assert.ok(frames.some((f) => f.type === "chunk" && f.data.line === "written while the page watched"), "so did the new chunk");
    assert.deepEqual(polls, [], "no long-poll of the job");
    // Created by: the admin viewing resolves the member to their subject.
    const members = (await api("GET", "/members")).members;
    const creator = members.find((m) => m.id === job.created_by);
    assert.ok(creator, `created_by ${job.created_by} is a member`);
    // (The demo admin's subject is their id: the key's jobs, below, show a name that is not.)
    await page.locator(".created-by", { hasText: `Created by ${creator.subject}` }).waitFor();
    await shot("job-live");
  } finally {
    page.off("websocket", onSocket);
    page.off("request", onRequest);
  }
});

browserTest("where the WebSocket upgrade is refused (as on AWS Lambda), a job page follows its job by long-polls", async () => {
  const job = await api("POST", "/jobs", { type: "sleep", payload: { ms: 3000, steps: 6 } });
  // A page of its own, signed in, whose WebSocket never opens: each one fails as a refused upgrade does.
  const lambda = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  try {
    await lambda.addInitScript(([workspace, token]) => {
      sessionStorage.setItem("offload.session", JSON.stringify({ workspace, token }));
      window.e2eRefused = 0;
      window.WebSocket = class {
        constructor() {
          window.e2eRefused += 1;
          setTimeout(() => (this.onerror?.({}), this.onclose?.({ code: 1006 })), 5);
        }
        send() {}
        close() {}
      };
    }, [WS, TOKEN]);
    const polls = [];
    lambda.on("request", (r) => /\?wait=/.test(r.url()) && polls.push(r.url()));
    await lambda.goto(`${URL_}/#/jobs/${job.id}`);
    await lambda.locator(".live-polling", { hasText: "live (long-polls)" }).waitFor();
    await lambda.locator(".badge", { hasText: "completed" }).first().waitFor({ timeout: 15_000 });
    await lambda.getByText("6 of 6 processed").waitFor();
    assert.equal(await lambda.evaluate(() => window.e2eRefused), 3, "three refusals, then the long-polls");
    assert.ok(polls.some((u) => u.includes(`/jobs/${job.id}?wait=`)), `long-polls of the job: ${polls}`);
    await lambda.screenshot({ path: `${SHOTS}/job-long-polls.png`, fullPage: true });
  } finally {
    await lambda.close();
  }
});

browserTest("a fan_out job's page lists its children with their status, 50 a page, each linked to its page", async () => {
  const parent = await api("POST", "/jobs", {
    type: "fan_out",
    payload: { jobs: Array.from({ length: 55 }, () => ({ type: "noop" })) },
  });
  await untilStatus(parent.id, "completed");
  const first = await api("GET", `/jobs/${parent.id}/children?limit=50`);
  const second = await api("GET", `/jobs/${parent.id}/children?limit=50&cursor=${first.next_cursor}`);
  await page.goto(`${URL_}/#/jobs/${parent.id}`);
  const ids = () => page.locator("table.children tbody tr[data-job]").evaluateAll((trs) => trs.map((tr) => tr.dataset.job));
  await page.waitForFunction(() => document.querySelectorAll("table.children tbody tr[data-job]").length === 50);
  assert.deepEqual(await ids(), first.jobs.map((j) => j.id), "in the order created");
  assert.equal(await page.locator("table.children .badge", { hasText: "completed" }).count(), 50);
  await shot("fan-out");
  await page.getByRole("navigation", { name: "Pages of children" }).getByRole("button", { name: "Next" }).click();
  await page.waitForFunction(() => document.querySelectorAll("table.children tbody tr[data-job]").length === 5);
  assert.deepEqual(await ids(), second.jobs.map((j) => j.id));
  const child = second.jobs[0];
  await page.locator(`tr[data-job="${child.id}"] a`).click();
  await page.getByRole("heading", { name: new RegExp(`noop ${child.id}`) }).waitFor();
  await page.locator(".created-by a", { hasText: parent.id }).click();
  await page.getByRole("heading", { name: new RegExp(`fan_out ${parent.id}`) }).waitFor();
});

browserTest("an approval job is approved from its page and completes with the approval", async () => {
  const job = await api("POST", "/jobs", { type: "approval", payload: { name: "e2e release", timeout_s: 600 } });
  await page.goto(`${URL_}/#/jobs/${job.id}`);
  await page.getByRole("heading", { name: "Waiting for a person to complete its wait token" }).waitFor({ timeout: 15_000 });
  await page.getByText("Approve e2e release?").waitFor();
  const waiting = await api("GET", `/jobs/${job.id}`);
  assert.equal(waiting.wait.kind, "token");
  await page.locator(`time[datetime="${waiting.wait.until}"]`).waitFor();
  await page.getByText(waiting.wait.token).waitFor();
  await shot("approval");
  await page.getByRole("button", { name: "Approve" }).click();
  await page.locator(".badge", { hasText: "completed" }).first().waitFor({ timeout: 15_000 });
  assert.deepEqual((await api("GET", `/jobs/${job.id}`)).result, { data: { approved: true } });
  await page.locator(".json", { hasText: "approved" }).waitFor();
});

browserTest("an admin adds a member, changes their role, and removes them", async () => {
  const asked = [];
  const onDialog = (d) => asked.push(d.message());
  page.on("dialog", onDialog);
  try {
    await page.goto(`${URL_}/#/members`);
    await page.getByRole("heading", { name: "Members" }).waitFor();
    await page.getByLabel("Subject (the token's sub)").fill("auth0|someone");
    await page.getByRole("button", { name: "Add member" }).click();
    const row = page.locator("tr", { hasText: "auth0|someone" });
    await row.waitFor();
    const find = async () => (await api("GET", "/members")).members.find((m) => m.subject === "auth0|someone");
    const added = await find();
    assert.equal(added.role, "member");
    assert.equal(added.issuer, null);
    await shot("members");
    await row.getByLabel("Role of auth0|someone").selectOption("admin");
    await page.getByRole("status").filter({ hasText: "auth0|someone is now admin" }).waitFor();
    const changed = await find();
    assert.deepEqual([changed.id, changed.role], [added.id, "admin"], "the same member, with the new role");
    await row.getByRole("button", { name: "Remove member auth0|someone" }).click();
    await row.waitFor({ state: "detached" });
    assert.equal(await find(), undefined);
    assert.equal(asked.length, 1);
    assert.match(asked[0], /Remove auth0\|someone\?/);
  } finally {
    page.off("dialog", onDialog);
  }
});

browserTest("an admin creates an API key, sees its secret once, copies it, and revokes it", async () => {
  await page.context().grantPermissions(["clipboard-read", "clipboard-write"], { origin: URL_ });
  await page.goto(`${URL_}/#/api-keys`);
  await page.getByRole("heading", { name: "API keys" }).waitFor();
  await page.getByLabel("Name").fill("e2e key");
  await page.getByRole("button", { name: "Create key" }).click();
  const key = await page.getByLabel("Secret").inputValue();
  assert.match(key, /^ofk_/);
  const stats = (k) => fetch(`${URL_}/api/workspaces/${WS}/stats`, { headers: { Authorization: `Bearer ${k}` } });
  assert.equal((await stats(key)).status, 200, "the key shown works");
  await page.getByRole("button", { name: "Copy" }).click();
  await page.getByText("Copied.").waitFor();
  assert.equal(await page.evaluate(() => navigator.clipboard.readText()), key);
  const row = page.locator("tr", { hasText: "e2e key" });
  await row.waitFor();
  const prefix = (await row.locator("td.mono").innerText()).replace("…", "");
  assert.ok(prefix.length > 4 && key.startsWith(prefix), `the list shows the key's start (${prefix})`);
  await shot("api-keys");
  await page.getByRole("button", { name: "Done" }).click();
  await page.goto(`${URL_}/#/`);
  await page.goto(`${URL_}/#/api-keys`);
  await row.waitFor();
  assert.ok(!(await page.content()).includes(key), "the secret is not shown again");
  await row.getByRole("button", { name: "Revoke key e2e key" }).click();
  await row.waitFor({ state: "detached" });
  assert.ok(!(await api("GET", "/api-keys")).api_keys.some((k) => k.name === "e2e key"));
  assert.equal((await stats(key)).status, 401, "a revoked key opens nothing");
});

browserTest("a member who is not an admin is told only admins manage members and keys, and sees creators as ids", async () => {
  const created = await api("POST", "/api-keys", { name: "e2e member key", role: "member" });
  try {
    const job = await (
      await fetch(`${URL_}/api/workspaces/${WS}/jobs`, {
        method: "POST",
        headers: { Authorization: `Bearer ${created.key}`, "Content-Type": "application/json" },
        body: JSON.stringify({ type: "noop" }),
      })
    ).json();
    assert.equal(job.created_by, created.id, "a key's job names the key");
    await signedInAs(created.key, async () => {
      await page.goto(`${URL_}/#/members`);
      await page.reload();
      await page.getByText("Only the workspace's admins manage its members.").waitFor();
      await shot("members-not-admin");
      await page.goto(`${URL_}/#/api-keys`);
      await page.getByText("Only the workspace's admins manage its API keys.").waitFor();
      await page.goto(`${URL_}/#/jobs/${job.id}`);
      await page.locator(".created-by", { hasText: `Created by ${created.id}` }).waitFor();
    });
    await page.goto(`${URL_}/#/jobs/${job.id}`);
    await page.locator(".created-by", { hasText: "Created by API key “e2e member key”" }).waitFor();
  } finally {
    await api("DELETE", `/api-keys/${created.id}`);
  }
});

browserTest("an expired token returns to sign-in", async () => {
  const expiring = process.env.OFFLOAD_EXPIRING_TOKEN;
  const expiresAt = Number(process.env.OFFLOAD_EXPIRING_AT) * 1000;
  // The API allows 30 s of clock skew past `exp`.
  const wait = expiresAt + 31_000 - Date.now();
  if (wait > 0) await new Promise((r) => setTimeout(r, wait));
  await page.evaluate(
    ([workspace, token]) => sessionStorage.setItem("offload.session", JSON.stringify({ workspace, token })),
    [WS, expiring],
  );
  // A fresh load, as when coming back to the tab later.
  await page.goto(`${URL_}/#/jobs`);
  await page.reload();
  await page.getByRole("heading", { name: "Sign in" }).waitFor();
  await page.getByRole("status").filter({ hasText: /Signed out: .*expired/ }).waitFor();
  assert.equal(await page.evaluate(() => sessionStorage.getItem("offload.session")), null);
  assert.equal(await page.getByLabel("Workspace id").inputValue(), WS, "the workspace is filled in again");
  await shot("signed-out");
  assert.deepEqual(cspErrors, [], "no Content-Security-Policy violation on any screen");
});
