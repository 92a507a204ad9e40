// Attempt fencing (protocol v1.1): a callback answered 409 "superseded" stops the handler, in
// both adapters. The fake gateway refuses every callback from the fence on, as the real one does.

import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { after, before, test } from 'node:test';

import {
  CallbackError, StepgateError, SupersededError, isStepgateControl, isSuperseded, isSuspend,
  rethrowIfStepgateControl, step, wrapFetchHandler, wrapNodeHandler,
} from '../src/index.js';
import { FakeGateway, SUPERSEDED_TYPE, invoke } from '../test-support/fake-gateway.js';

const LIMIT = { timeout: 20_000 };

/** @type {FakeGateway} */
let gateway;
before(async () => {
  gateway = await FakeGateway.start();
});
after(async () => {
  await gateway.close();
});

/**
 * @param {import('node:test').TestContext} t
 * @param {(req: import('node:http').IncomingMessage, res: import('node:http').ServerResponse) => unknown} listener
 */
async function serve(t, listener) {
  const server = createServer(listener);
  await new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(undefined)));
  t.after(() => new Promise((resolve) => {
    server.closeAllConnections();
    server.close(() => resolve(undefined));
  }));
  const address = /** @type {import('node:net').AddressInfo} */ (server.address());
  return `http://127.0.0.1:${address.port}/`;
}

/** Three steps in a handler that catches (and swallows) every Error, as handlers do. */
function booking() {
  /** @type {string[]} */
  const ran = [];
  /** @type {unknown[]} */
  const caught = [];
  const work = (/** @type {string} */ name) => {
    ran.push(name);
    return name;
  };
  const book = async () => {
    try {
      for (const name of ['first', 'second', 'third']) await step.run(name, work, name);
    } catch (err) {
      if (err instanceof Error) caught.push(err);   // an ordinary error filter
      else throw err;
    }
  };
  return { ran, caught, book };
}

/**
 * @param {Response} response
 * @param {{ id: string, attempt: number }} run
 */
async function assertSuperseded(response, run) {
  assert.equal(response.status, 409);
  assert.equal(response.headers.get('content-type'), 'application/problem+json');
  assert.equal(response.headers.get('stepgate-no-retry'), null);
  const problem = await response.json();
  assert.equal(problem.type, SUPERSEDED_TYPE);
  assert.equal(problem.status, 409);
  assert.equal(problem.run_id, run.id);
  assert.equal(problem.attempt, run.attempt);
}

test('the signal is no Error, is recognised, and rethrowIfStepgateControl rethrows it', LIMIT, () => {
  const signal = new SupersededError({ runId: 'r', attempt: 1, currentAttempt: 2 });
  assert.equal(signal instanceof Error, false);
  assert.equal(signal instanceof StepgateError, false);
  assert.equal(isSuperseded(signal), true);
  assert.equal(isStepgateControl(signal), true);
  assert.equal(isSuspend(signal), false);
  assert.match(String(signal), /attempt 1 of run r was superseded \(the run is at attempt 2\)/);
  assert.throws(() => rethrowIfStepgateControl(signal), (err) => err === signal);
  for (const other of [new Error('x'), null, { name: 'SupersededError' }]) {
    assert.equal(isSuperseded(other), false);
    assert.doesNotThrow(() => rethrowIfStepgateControl(other));
  }
});

test('node: a refused PUT stops the handler and the adapter answers 409', LIMIT, async (t) => {
  const run = gateway.createRun();
  gateway.fence(run, 'PUT second');
  const { ran, caught, book } = booking();
  /** @type {unknown[]} */
  const errors = [];
  const url = await serve(t, wrapNodeHandler(async (req, res) => {
    await book();
    res.end('booked');
  }, { onError: (error) => errors.push(error) }));
  const response = await invoke(gateway, run, url);
  await assertSuperseded(response, run);
  assert.deepEqual(ran, ['first', 'second']);
  assert.deepEqual(caught, []);
  assert.deepEqual(errors, [], 'the signal is not reported as an error');
  assert.deepEqual(gateway.callsOf(run).map((call) => `${call.method} ${call.stepId}`),
    ['PUT first', 'PUT second']);
});

test('node: a handler that swallows the signal cannot answer or run more steps', LIMIT, async (t) => {
  const run = gateway.createRun();
  gateway.fence(run, 'PUT first');
  /** @type {unknown[]} */
  const later = [];
  let ran = 0;
  const url = await serve(t, wrapNodeHandler(async (req, res) => {
    try {
      await step.run('first', () => 1);
    } catch {
      // a bare catch: swallows everything
    }
    later.push(await step.run('second', () => { ran += 1; }).catch((err) => err));
    later.push(await step.sleep('nap', '1h').catch((err) => err));
    res.writeHead(200);
    res.end('swallowed');
  }));
  const response = await invoke(gateway, run, url);
  await assertSuperseded(response, run);
  assert.equal(ran, 0);
  assert.equal(later.length, 2);
  assert.ok(later.every((err) => isSuperseded(err)) && later[0] === later[1]);
  assert.deepEqual(gateway.callsOf(run).map((call) => call.stepId), ['first']);
});

test('fetch: a refused PUT stops the handler and the adapter answers 409', LIMIT, async () => {
  const run = gateway.createRun();
  gateway.fence(run, 'PUT second');
  const { ran, caught, book } = booking();
  const handler = wrapFetchHandler(async () => {
    await book();
    return new Response('booked');
  }, { onError: () => assert.fail('nothing to report') });
  await assertSuperseded(await invoke(gateway, run, handler), run);
  assert.deepEqual(ran, ['first', 'second']);
  assert.deepEqual(caught, []);
  assert.deepEqual(gateway.callsOf(run).map((call) => call.stepId), ['first', 'second']);
});

test('fetch: a refused step list runs nothing', LIMIT, async () => {
  const run = gateway.createRun({ steps: [{ id: 'first', output: 1 }] });
  gateway.fence(run, 'GET steps');
  let ran = 0;
  const handler = wrapFetchHandler(async () => {
    await step.run('first', () => { ran += 1; });
    await step.run('second', () => { ran += 1; });
    return new Response('done');
  });
  await assertSuperseded(await invoke(gateway, run, handler), run);
  assert.equal(ran, 0);
  assert.deepEqual(gateway.callsOf(run).map((call) => call.method), ['GET']);
});

test('a refused failure record throws the signal instead of the step\'s error', LIMIT, async () => {
  const run = gateway.createRun();
  gateway.fence(run, 'PUT flaky');
  /** @type {unknown} */
  let seen;
  const handler = wrapFetchHandler(async () => {
    try {
      await step.run('flaky', () => { throw new Error('down'); });
    } catch (err) {
      seen = err;
      throw err;
    }
    return new Response('unreachable');
  });
  await assertSuperseded(await invoke(gateway, run, handler), run);
  assert.equal(isSuperseded(seen), true);
  assert.equal(/** @type {SupersededError} */ (seen).stepId, 'flaky');
});

test('parallel steps: the first refusal wins and a running step sends nothing', LIMIT, async () => {
  const run = gateway.createRun();
  gateway.fence(run, 'PUT fast');
  /** @type {(value?: unknown) => void} */
  let release = () => {};
  const slowMayFinish = new Promise((resolve) => { release = resolve; });
  /** @type {PromiseSettledResult<unknown>[]} */
  let settled = [];
  /** @type {string[]} */
  const ran = [];
  const handler = wrapFetchHandler(async () => {
    const slow = step.run('slow', async () => {
      ran.push('slow');
      await slowMayFinish;
      return 'slow';
    });
    const fast = step.run('fast', () => {
      ran.push('fast');
      return 'fast';
    });
    await fast.catch(() => release());
    settled = await Promise.allSettled([slow, fast, step.run('after', () => ran.push('after'))]);
    return new Response('unreachable');
  });
  await assertSuperseded(await invoke(gateway, run, handler), run);
  assert.deepEqual(ran, ['slow', 'fast']);
  const reasons = settled.map((result) => result.status === 'rejected' ? result.reason : null);
  assert.ok(reasons.every((reason) => isSuperseded(reason)));
  assert.ok(reasons[0] === reasons[1] && reasons[1] === reasons[2], 'one signal for all');
  assert.deepEqual(gateway.callsOf(run).map((call) => call.stepId), ['fast']);
});

test('another 409 stays a CallbackError and is not a fence', LIMIT, async () => {
  const run = gateway.createRun();
  gateway.intercept = ({ method }) => method === 'PUT'
    ? { status: 409, body: { type: 'about:blank', title: 'Conflict', status: 409, detail: 'a sleep' } }
    : undefined;
  /** @type {unknown} */
  let seen;
  try {
    const handler = wrapFetchHandler(async () => {
      seen = await step.run('first', () => 1).catch((err) => err);
      return new Response('handled', { status: 200 });
    });
    const response = await invoke(gateway, run, handler);
    assert.equal(response.status, 200);
  } finally {
    gateway.intercept = null;
  }
  assert.ok(seen instanceof CallbackError);
  assert.equal(/** @type {CallbackError} */ (seen).status, 409);
});
