// Outside the gateway (no adapter, or no Stepgate headers) steps simply run in-process.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { StepOutputError, StepUsageError, step, wrapFetchHandler, wrapNodeHandler } from '../src/index.js';

// A hung test fails instead of stalling the run.
const LIMIT = { timeout: 20_000 };

test('step.run calls the function with the arguments and returns its JSON value', LIMIT, async () => {
  let calls = 0;
  const value = await step.run('add', async (a, b) => {
    calls += 1;
    return { sum: a + b, at: new Date(0), missing: undefined };
  }, 2, 3);
  assert.deepEqual(value, { sum: 5, at: '1970-01-01T00:00:00.000Z' });
  assert.equal(calls, 1);
  assert.equal(await step.run('nothing', () => undefined), null);
});

test('step.run runs every call, repeated names included', LIMIT, async () => {
  let calls = 0;
  for (let i = 0; i < 3; i += 1) await step.run('same', () => { calls += 1; });
  assert.equal(calls, 3);
});

test('step errors are rethrown as the same object', LIMIT, async () => {
  const failure = new Error('boom');
  await assert.rejects(step.run('fails', () => { throw failure; }), (err) => err === failure);
});

test('non-JSON outputs are rejected locally too, so they show up before production', LIMIT, async () => {
  await assert.rejects(step.run('bigint', () => 1n), StepOutputError);
  await assert.rejects(step.run('function', () => () => 1), /not JSON/);
});

test('nested steps are rejected locally too', LIMIT, async () => {
  await assert.rejects(step.run('outer', () => step.run('inner', () => 1)),
    /"inner" was called inside step "outer"/);
  // Sibling steps after a finished step are fine: the step context does not leak out.
  await step.run('first', () => 1);
  assert.equal(await step.run('second', () => 2), 2);
});

test('step.sleep waits in-process for milliseconds or a duration string', LIMIT, async () => {
  let started = performance.now();
  await step.sleep('ms', 60);
  assert.ok(performance.now() - started >= 55, 'slept at least ~60ms');
  started = performance.now();
  await step.sleep('string', '0.06s');
  assert.ok(performance.now() - started >= 55);
});

test('step.sleepUntil waits until the instant; a past instant returns at once', LIMIT, async () => {
  const started = Date.now();
  await step.sleepUntil('soon', new Date(started + 60));
  assert.ok(Date.now() >= started + 60);
  const before = performance.now();
  await step.sleepUntil('past', started - 10_000);
  assert.ok(performance.now() - before < 50);
});

test('step.waitForEvent explains that it needs the gateway', LIMIT, async () => {
  await assert.rejects(step.waitForEvent('paid', { event: 'order.paid' }), (err) => {
    assert.ok(err instanceof StepUsageError);
    assert.match(err.message, /needs the Stepgate gateway/);
    assert.match(err.message, /Stepgate-Callback and Stepgate-Token/);
    return true;
  });
});

test('step.signal explains that it needs the gateway, and wants a positive timeout', LIMIT, async () => {
  await assert.rejects(step.signal('approve', { timeout: '2d' }), (err) => {
    assert.ok(err instanceof StepUsageError);
    assert.match(err.message, /step.signal\("approve"\) needs the Stepgate gateway/);
    return true;
  });
  await assert.rejects(step.signal('approve', { timeout: 0 }), /positive timeout/);
});

test('step.invoke needs the gateway, a route and a JSON body', LIMIT, async () => {
  await assert.rejects(step.invoke('book', { route: 'hotels', body: {} }), /step.invoke\("book"\) needs the Stepgate gateway/);
  await assert.rejects(step.invoke('book', /** @type {any} */ ({})), /needs options \{ route, body\? \}/);
  await assert.rejects(step.invoke('book', { route: 'hotels', body: 10n }), /body must be JSON/);
});

test('wrapped handlers without Stepgate headers run steps locally and answer normally', LIMIT, async () => {
  let calls = 0;
  const handler = wrapFetchHandler(async () => {
    const value = await step.run('work', () => { calls += 1; return 'local'; });
    await step.sleep('short', 1);
    return new Response(String(value));
  });
  const response = await handler(new Request('http://service.test/', {
    headers: { 'stepgate-callback': 'http://127.0.0.1:9/v1/runs/x' }, // no token: not gateway mode
  }));
  assert.equal(await response.text(), 'local');
  assert.equal(calls, 1);
  assert.equal(typeof wrapNodeHandler(() => {}), 'function');
});
