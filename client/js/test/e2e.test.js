// End to end against the real Python gateway. Skipped unless STEPGATE_E2E_CMD is set.
//
// STEPGATE_E2E_CMD is a shell command that starts the gateway; "{config}" in it is replaced by
// the path of a config file this test writes, and without it "--config <path>" is appended:
//
//   STEPGATE_E2E_CMD="stepgate serve" npm test
//   STEPGATE_E2E_CMD="python -m gateway.cli serve --config {config}" npm test
//
// The test runs the upstreams in-process (the trip example and a sleep-and-wait flow), puts the
// gateway in front of them on free loopback ports with a fresh SQLite file, and talks to it
// over HTTP the way a client and an event sender would.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';

import { STEPS, createTripService } from '../../../examples/js/trip_service.mjs';
import {
  NonRetriableError, StepFailedError, isSuperseded, step, wrapNodeHandler,
} from '../src/index.js';

const COMMAND = process.env.STEPGATE_E2E_CMD?.trim() ?? '';
const SKIP = COMMAND === ''
  ? 'STEPGATE_E2E_CMD is not set; set it to the command that starts the gateway (e.g. "stepgate serve") to run the end-to-end tests'
  : false;
const TRIP = JSON.stringify({ traveller: 'Grace Hopper', flight: 'UA 42', hotel: 'The Drake' });

describe('end to end against the real gateway', { skip: SKIP }, () => {
  /** @type {string} */
  let directory;
  /** @type {import('node:child_process').ChildProcess} */
  let gatewayProcess;
  let gatewayOutput = '';
  let publicUrl = '';
  let internalUrl = '';
  /** @type {import('node:http').Server[]} */
  const servers = [];
  /** @type {Record<string, number>} */
  let executions;
  const flowRuns = { start: 0 };
  // The fenced route: how often each step ran, and what each attempt's handler went through.
  /** @type {Record<string, number>} */
  const fenceRan = { first: 0, second: 0, third: 0 };
  /** @type {Map<number, string>} */
  const fenceEnded = new Map();
  /** @type {Map<number, () => void>} */
  const fenceWaiters = new Map();
  /** @type {string[]} the signal URLs the desk route "mailed" */
  const deskMailed = [];
  const agencyRan = { agency: 0, room: 0 };

  before(async () => {
    directory = await mkdtemp(join(tmpdir(), 'stepgate-js-e2e-'));
    const trips = createTripService({ onError: () => {} });
    executions = trips.executions;
    const flow = createServer(wrapNodeHandler(async (req, res) => {
      const id = new URL(req.url ?? '/', 'http://localhost').searchParams.get('id');
      const started = await step.run('start', () => {
        flowRuns.start += 1;
        return { id, at: Date.now() };
      });
      await step.sleep('pause', 300);
      const approval = await step.waitForEvent('approval', {
        event: 'flow.approved', match: { 'data.flow': id }, timeout: '30s',
      });
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ started, approval }));
    }, { onError: () => {} }));
    // The second step takes 2 s the first time it runs, against the route's 1 s timeout.
    const fence = createServer(wrapNodeHandler(async (req, res) => {
      const attempt = Number(req.headers['stepgate-attempt']);
      /** @type {Record<string, unknown>} */
      const outputs = {};
      try {
        for (const name of ['first', 'second', 'third']) {
          outputs[name] = await step.run(name, async () => {
            fenceRan[name] += 1;
            if (name === 'second' && fenceRan[name] === 1) await new Promise((resolve) => setTimeout(resolve, 2_000));
            return `${name} by attempt ${attempt}`;
          });
        }
        fenceEnded.set(attempt, 'answered');
      } catch (err) {
        if (err instanceof Error) {   // an ordinary error filter must not see the signal
          fenceEnded.set(attempt, `caught ${err.message}`);
        } else {
          fenceEnded.set(attempt, isSuperseded(err) ? 'superseded' : 'other signal');
          throw err;
        }
      } finally {
        fenceWaiters.get(attempt)?.();
      }
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify(outputs));
    }, { onError: () => {} }));
    // An approval: the signal's URL is "mailed" from a step, then the run parks on it.
    const desk = createServer(wrapNodeHandler(async (req, res) => {
      const approval = await step.signal('approve', { timeout: '30s' });
      await step.run('mail', () => { deskMailed.push(approval.url); return 'sent'; });
      const decision = await approval.wait();
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ decision, url: approval.url }));
    }, { onError: () => {} }));
    // A child run: /agency invokes the durable route `rooms` (/rooms on the same server).
    const agency = createServer(wrapNodeHandler(async (req, res) => {
      const url = new URL(req.url ?? '/', 'http://localhost');
      const send = (/** @type {number} */ status, /** @type {unknown} */ body) => {
        res.writeHead(status, { 'content-type': 'application/json' });
        res.end(JSON.stringify(body));
      };
      if (url.pathname === '/rooms') {
        const chunks = [];
        for await (const chunk of req) chunks.push(chunk);
        const { nights } = JSON.parse(Buffer.concat(chunks).toString());
        return send(200, await step.run('room', () => {
          agencyRan.room += 1;
          if (nights > 7) throw new NonRetriableError('no room for that long', { status: 409 });
          return { room: 12, nights };
        }));
      }
      agencyRan.agency += 1;
      try {
        const nights = Number(url.searchParams.get('nights'));
        return send(200, { hotel: await step.invoke('book-hotel', { route: 'rooms', body: { nights } }) });
      } catch (err) {
        if (!(err instanceof StepFailedError)) throw err;
        return send(409, { failed: err.status, step: err.stepId });
      }
    }, { onError: () => {} }));
    servers.push(trips.server, flow, fence, desk, agency);
    const [tripsPort, flowPort, fencePort, deskPort, agencyPort, publicPort, internalPort] = [
      await listen(trips.server), await listen(flow), await listen(fence), await listen(desk),
      await listen(agency), await freePort(), await freePort(),
    ];
    publicUrl = `http://127.0.0.1:${publicPort}`;
    internalUrl = `http://127.0.0.1:${internalPort}`;
    const config = join(directory, 'stepgate.yaml');
    await writeFile(config, [
      `listen: 127.0.0.1:${publicPort}`,
      `internal_listen: 127.0.0.1:${internalPort}`,
      `store: sqlite:///${join(directory, 'stepgate.db')}`,
      'routes:',
      '  - name: trips',
      '    path: /trips',
      '    methods: [POST]',
      `    upstream: http://127.0.0.1:${tripsPort}`,
      '    durable: true',
      '    timeout: 10s',
      '    hold: 15s',
      '    retry: {attempts: 4, initial: 50ms, max: 200ms, multiplier: 2}',
      '  - name: flow',
      '    path: /flow',
      `    upstream: http://127.0.0.1:${flowPort}`,
      '    durable: true',
      '    hold: 15s',
      '  - name: fence',
      '    path: /fence',
      `    upstream: http://127.0.0.1:${fencePort}`,
      '    durable: true',
      '    timeout: 1s',
      '    hold: 15s',
      '    retry: {attempts: 3, initial: 50ms, max: 50ms}',
      '  - name: desk',
      '    path: /desk',
      `    upstream: http://127.0.0.1:${deskPort}`,
      '    durable: true',
      '  - name: agency',
      '    path: /agency',
      `    upstream: http://127.0.0.1:${agencyPort}`,
      '    durable: true',
      '    hold: 15s',
      '  - name: rooms',
      '    path: /rooms',
      `    upstream: http://127.0.0.1:${agencyPort}`,
      '    durable: true',
      '',
    ].join('\n'));
    const command = COMMAND.includes('{config}')
      ? COMMAND.replaceAll('{config}', config) : `${COMMAND} --config ${config}`;
    // Its own process group, so the cleanup can stop the shell and the gateway together.
    gatewayProcess = spawn(command, { shell: true, detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
    gatewayProcess.stdout?.on('data', (chunk) => { gatewayOutput += chunk; });
    gatewayProcess.stderr?.on('data', (chunk) => { gatewayOutput += chunk; });
    await waitUntilReady(`${internalUrl}/readyz`, gatewayProcess, () => gatewayOutput);
  });

  after(async () => {
    if (gatewayProcess?.pid !== undefined && gatewayProcess.exitCode === null) {
      const exited = once(gatewayProcess, 'exit');
      process.kill(-gatewayProcess.pid, 'SIGTERM');
      // unref: a pending grace timer must not keep the test process alive after the exit.
      await Promise.race([exited, new Promise((resolve) => setTimeout(resolve, 10_000).unref())]);
      if (gatewayProcess.exitCode === null) process.kill(-gatewayProcess.pid, 'SIGKILL');
    }
    for (const server of servers) {
      server.closeAllConnections();
      server.close();
    }
    if (directory) await rm(directory, { recursive: true, force: true });
  });

  /** Executions since `start`, per step. */
  const delta = (/** @type {Record<string, number>} */ start) =>
    Object.fromEntries(STEPS.map((name) => [name, executions[name] - start[name]]));

  test('a failing step is retried alone and the client gets the final answer', { timeout: 60_000 }, async () => {
    const start = { ...executions };
    const response = await fetch(`${publicUrl}/trips?fail=charge-card`, {
      method: 'POST', headers: { 'content-type': 'application/json' }, body: TRIP,
    });
    const text = await response.text();
    assert.equal(response.status, 200, `${text}\n${gatewayOutput}`);
    assert.ok(response.headers.get('stepgate-run-id'));
    assert.equal(JSON.parse(text).traveller, 'Grace Hopper');
    assert.deepEqual(delta(start),
      { 'reserve-flight': 1, 'reserve-hotel': 1, 'charge-card': 2, 'send-confirmation': 1, 'refund-flight': 0 });
  });

  test('a step that always fails spends the attempts and ends the run failed', { timeout: 60_000 }, async () => {
    const start = { ...executions };
    const response = await fetch(`${publicUrl}/trips?fail=charge-card:always`, {
      method: 'POST', headers: { 'content-type': 'application/json' }, body: TRIP,
    });
    await response.arrayBuffer();
    assert.equal(response.status, 500);
    assert.deepEqual(delta(start),
      { 'reserve-flight': 1, 'reserve-hotel': 1, 'charge-card': 4, 'send-confirmation': 0, 'refund-flight': 0 });
  });

  test('a hotel that fails for good is compensated: the flight is refunded, 409', { timeout: 60_000 }, async () => {
    const start = { ...executions };
    const response = await fetch(`${publicUrl}/trips?fail=reserve-hotel:always`, {
      method: 'POST', headers: { 'content-type': 'application/json' }, body: TRIP,
    });
    const answer = await response.json();
    assert.equal(response.status, 409, JSON.stringify(answer));
    assert.match(answer.refund.refund, /^RF-/);
    assert.deepEqual(delta(start),
      { 'reserve-flight': 1, 'reserve-hotel': 3, 'charge-card': 0, 'send-confirmation': 0, 'refund-flight': 1 });
    const run = await (await fetch(`${internalUrl}/v1/runs/${response.headers.get('stepgate-run-id')}`)).json();
    const hotel = run.steps.find((/** @type {any} */ s) => s.id === 'reserve-hotel');
    assert.equal(hotel.final, true);
    assert.equal(hotel.attempts, 3);
  });

  test('a run sleeps, waits for an event, and is delivered through the poll URL', { timeout: 60_000 }, async () => {
    const id = `flow-${Date.now()}`;
    const accepted = await fetch(`${publicUrl}/flow?id=${id}`, {
      method: 'POST', headers: { prefer: 'respond-async' }, body: '{}', redirect: 'manual',
    });
    assert.equal(accepted.status, 202, await accepted.text());
    const location = accepted.headers.get('location');
    assert.ok(location?.startsWith('/_stepgate/runs/'), String(location));
    const sent = await fetch(`${internalUrl}/v1/events`, {
      method: 'POST', headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ name: 'flow.approved', data: { flow: id } }),
    });
    assert.equal(sent.status, 202, await sent.text());
    const deadline = Date.now() + 30_000;
    for (;;) {
      const poll = await fetch(`${publicUrl}${location}&wait=5`);
      const text = await poll.text();
      if (poll.status !== 202) {
        assert.equal(poll.status, 200, `${text}\n${gatewayOutput}`);
        const body = JSON.parse(text);
        assert.equal(body.started.id, id);
        assert.equal(body.approval.name, 'flow.approved');
        assert.deepEqual(body.approval.data, { flow: id });
        break;
      }
      assert.ok(Date.now() < deadline, 'the flow did not finish in 30s');
    }
    assert.equal(flowRuns.start, 1, 'the first step ran once across all invocations');
  });

  test('a signal\'s URL, POSTed to once, resumes the parked run with its body', { timeout: 60_000 }, async () => {
    const accepted = await fetch(`${publicUrl}/desk`, {
      method: 'POST', headers: { prefer: 'respond-async' }, body: '{}', redirect: 'manual',
    });
    assert.equal(accepted.status, 202, await accepted.text());
    const location = accepted.headers.get('location');
    const deadline = Date.now() + 10_000;
    while (deskMailed.length === 0) {
      assert.ok(Date.now() < deadline, `no signal URL was mailed in 10s\n${gatewayOutput}`);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    const [url] = deskMailed;
    assert.match(url, /^\/_stepgate\/signals\/[\w-]+\?token=[\w-]+$/);
    const post = (/** @type {unknown} */ body) => fetch(`${publicUrl}${url}`, {
      method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body),
    });
    const first = await post({ approved: true, by: 'grace' });
    assert.equal(first.status, 202, await first.text());
    const again = await post({ approved: false });
    assert.equal(again.status, 409);
    await again.arrayBuffer();
    const poll = await fetch(`${publicUrl}${location}&wait=10`);
    const text = await poll.text();
    assert.equal(poll.status, 200, `${text}\n${gatewayOutput}`);
    assert.deepEqual(JSON.parse(text), { decision: { approved: true, by: 'grace' }, url });
    assert.equal(deskMailed.length, 1, 'the replay took the mail from the record');
  });

  test('step.invoke runs a child run once and answers with its body, or StepFailedError', { timeout: 60_000 }, async () => {
    const booked = await fetch(`${publicUrl}/agency?nights=2`, { method: 'POST', body: '{}' });
    const text = await booked.text();
    assert.equal(booked.status, 200, `${text}\n${gatewayOutput}`);
    assert.deepEqual(JSON.parse(text), { hotel: { room: 12, nights: 2 } });
    assert.deepEqual(agencyRan, { agency: 2, room: 1 }, 'parked, then woken by the child');
    const parent = await (await fetch(`${internalUrl}/v1/runs/${booked.headers.get('stepgate-run-id')}`)).json();
    assert.equal(parent.children.length, 1);
    assert.equal(parent.children[0].route, 'rooms');
    const child = await (await fetch(`${internalUrl}/v1/runs/${parent.children[0].id}`)).json();
    assert.equal(child.parent_id, parent.id);

    const refused = await fetch(`${publicUrl}/agency?nights=9`, { method: 'POST', body: '{}' });
    assert.equal(refused.status, 409);
    assert.deepEqual(await refused.json(), { failed: 409, step: 'book-hotel' });
  });

  test('a timed-out attempt\'s handler is fenced: it never runs a step the next one recorded', { timeout: 60_000 }, async () => {
    const attemptOneDone = new Promise((resolve) => fenceWaiters.set(1, () => resolve(undefined)));
    const started = Date.now();
    const response = await fetch(`${publicUrl}/fence`, { method: 'POST', body: '{}' });
    const text = await response.text();
    assert.equal(response.status, 200, `${text}\n${gatewayOutput}`);
    assert.ok(Date.now() - started < 2_000, 'attempt 2 answered while attempt 1 was still in its slow step');
    assert.deepEqual(JSON.parse(text), {
      first: 'first by attempt 1', second: 'second by attempt 2', third: 'third by attempt 2',
    });
    await attemptOneDone;
    assert.equal(fenceEnded.get(1), 'superseded');
    assert.equal(fenceEnded.get(2), 'answered');
    assert.deepEqual(fenceRan, { first: 1, second: 2, third: 1 },
      'only the step attempt 1 never recorded ran twice');
    const runId = response.headers.get('stepgate-run-id');
    const run = await (await fetch(`${internalUrl}/v1/runs/${runId}`)).json();
    assert.equal(run.status, 'completed');
    assert.deepEqual(run.attempts.map((/** @type {any} */ a) => a.outcome), ['timeout', 'response']);
    const second = run.steps.find((/** @type {any} */ s) => s.id === 'second');
    assert.equal(second.output, 'second by attempt 2');
  });
});

/**
 * @param {import('node:http').Server} server
 * @returns {Promise<number>}
 */
async function listen(server) {
  await new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(undefined)));
  return /** @type {import('node:net').AddressInfo} */ (server.address()).port;
}

/** A port that was free a moment ago (the gateway binds it right after). */
async function freePort() {
  const probe = createServer();
  const port = await listen(probe);
  await new Promise((resolve) => probe.close(() => resolve(undefined)));
  return port;
}

/**
 * @param {string} url
 * @param {import('node:child_process').ChildProcess} child
 * @param {() => string} output
 */
async function waitUntilReady(url, child, output) {
  const deadline = Date.now() + 30_000;
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`the gateway exited with ${child.exitCode}:\n${output()}`);
    try {
      const response = await fetch(url);
      await response.arrayBuffer();
      if (response.ok) return;
    } catch {
      // Not listening yet.
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  throw new Error(`the gateway was not ready in 30s:\n${output()}`);
}
