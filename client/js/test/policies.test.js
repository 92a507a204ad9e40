// Step policies (protocol v1.1) against the in-process fake gateway: the policy a failed attempt
// carries, StepFailedError on the attempt that spends it and on every replay, a handler that
// compensates, time-outs, and step.sendEvent.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import {
  StepFailedError, StepTimeoutError, StepUsageError, step, wrapFetchHandler,
} from '../src/index.js';
import { FakeGateway, drive, invoke } from '../test-support/fake-gateway.js';

const LIMIT = { timeout: 20_000 };

/** @type {FakeGateway} */
let gateway;
before(async () => {
  gateway = await FakeGateway.start();
});
after(async () => {
  await gateway.close();
});

/** @param {(request: Request) => Promise<Response>} handler */
function wrap(handler) {
  return wrapFetchHandler(handler, { onError: () => {} });
}

describe('retries', () => {
  test('a failed attempt carries the policy; the last one gets StepFailedError', LIMIT, async () => {
    const run = gateway.createRun();
    let charged = 0;
    /** @type {unknown[]} */
    const caught = [];
    const handler = wrap(async () => {
      try {
        await step.run('charge', { retries: 2, backoff: { initial: '1s', max: '5s', multiplier: 3 } }, () => {
          charged += 1;
          throw new TypeError('card service down');
        });
      } catch (err) {
        caught.push(err);
        if (!(err instanceof StepFailedError)) throw err;
        const refund = await step.run('refund', () => 'RF-1');
        return Response.json({ refund }, { status: 409 });
      }
      return new Response('charged');
    });
    const result = await drive(gateway, run, handler);
    assert.equal(result.status, 409);
    assert.deepEqual(JSON.parse(result.text), { refund: 'RF-1' });
    assert.equal(charged, 3);
    const policies = gateway.callsOf(run)
      .filter((call) => call.method === 'PUT' && call.stepId === 'charge')
      .map((call) => call.body.policy);
    assert.deepEqual(policies, Array(3).fill({ attempts: 3, initial: '1s', max: '5s', multiplier: 3 }));
    assert.equal(caught.length, 3);
    assert.ok(caught[0] instanceof TypeError);
    const final = /** @type {StepFailedError} */ (caught[2]);
    assert.ok(final instanceof StepFailedError);
    assert.equal(final.stepId, 'charge');
    assert.equal(final.attempts, 3);
    assert.deepEqual(final.error, { message: 'card service down', type: 'TypeError' });
    assert.ok(final.cause instanceof TypeError);
    assert.match(final.message, /^step "charge" failed for good after 3 attempts: card service down$/);
  });

  test('a replay of a final step throws again without running it', LIMIT, async () => {
    const run = gateway.createRun();
    run.steps.set('charge', {
      id: 'charge', seq: 0, kind: 'run', status: 'failed', attempts: 4, final: true,
      error: { message: 'declined', type: 'Error' },
    });
    let ran = 0;
    const handler = wrap(async () => {
      await step.run('charge', { retries: 3 }, () => { ran += 1; });
      return new Response('charged');
    });
    const response = await invoke(gateway, run, handler, { headers: { 'stepgate-steps': '1' } });
    // Left uncaught it ends the run: retrying cannot change a final step.
    assert.equal(response.status, 500);
    assert.equal(response.headers.get('stepgate-no-retry'), 'true');
    assert.equal((await response.json()).detail, 'step "charge" failed for good');
    assert.equal(ran, 0);
    assert.deepEqual(gateway.callsOf(run).map((call) => call.method), ['GET']);
  });

  test('without retries a failed attempt sends no policy (the route decides)', LIMIT, async () => {
    const run = gateway.createRun();
    const handler = wrap(async () => {
      await step.run('x', { timeout: '5s' }, () => { throw new Error('no'); });
      return new Response('ok');
    });
    const response = await invoke(gateway, run, handler);
    assert.equal(response.status, 500);
    const [put] = gateway.callsOf(run);
    assert.equal('policy' in put.body, false);
  });

  test('options are checked at the call', LIMIT, async () => {
    const bad = [
      [{ retries: -1 }, /retries must be a whole number from 0 to 999/],
      [{ retries: 1.5 }, /retries must be/],
      [{ retries: 1000 }, /retries must be/],
      [{ backoff: '1s' }, /backoff needs retries/],
      [{ retries: 1, backoff: { initial: '2m', max: '1m' } }, /initial is longer/],
      [{ retries: 1, backoff: { max: '2d' } }, /at most 1 day/],
      [{ retries: 1, backoff: { multiplier: 0.5 } }, /multiplier must be a number from 1 to 100/],
      [{ retries: 1, backoff: { jitter: true } }, /unknown backoff option "jitter"/],
      [{ retries: 1, backoff: true }, /backoff is a duration/],
      [{ timeout: 0 }, /longer than 0/],
      [{ timeout: 'soon' }, /not a duration/],
      [{ tries: 3 }, /unknown option "tries"/],
    ];
    for (const [options, message] of bad) {
      await assert.rejects(step.run('x', /** @type {any} */ (options), () => 1), message, JSON.stringify(options));
    }
    await assert.rejects(step.run('x', { retries: 1 }), StepUsageError);
  });
});

describe('time-out', () => {
  test('a step slower than its timeout is a failed attempt with StepTimeoutError', LIMIT, async () => {
    const run = gateway.createRun();
    /** @type {unknown} */
    let caught = null;
    const handler = wrap(async () => {
      try {
        await step.run('slow', { timeout: 50 }, () => new Promise((resolve) => setTimeout(resolve, 2_000, 'late')));
      } catch (err) {
        caught = err;
        throw err;
      }
      return new Response('ok');
    });
    const response = await invoke(gateway, run, handler);
    assert.equal(response.status, 500);
    assert.ok(caught instanceof StepTimeoutError);
    assert.equal(/** @type {StepTimeoutError} */ (caught).timeout, 50);
    const record = run.steps.get('slow');
    assert.equal(record?.status, 'failed');
    assert.equal(record?.error?.type, 'StepTimeoutError');
    assert.match(record?.error?.message ?? '', /took longer than its timeout of 50ms/);
  });

  test('outside the gateway the time-out holds too', LIMIT, async () => {
    await assert.rejects(
      step.run('slow', { timeout: 20 }, () => new Promise((resolve) => setTimeout(resolve, 1_000))),
      StepTimeoutError);
    assert.equal(await step.run('quick', { timeout: 1_000 }, (/** @type {number} */ n) => n + 1, 1), 2);
  });
});

describe('sendEvent', () => {
  test('sends once and returns the id; a replay returns the recorded id', LIMIT, async () => {
    const run = gateway.createRun();
    let attempt = 0;
    /** @type {string[]} */
    const ids = [];
    const handler = wrap(async () => {
      attempt += 1;
      ids.push(await step.sendEvent('trip.booked', { trip: 't-1' }));
      if (attempt === 1) throw new Error('later step failed');
      return new Response('ok');
    });
    const result = await drive(gateway, run, handler);
    assert.equal(result.status, 200);
    assert.equal(ids.length, 2);
    assert.equal(ids[0], ids[1]);
    const posts = gateway.callsOf(run).filter((call) => call.method === 'POST');
    assert.equal(posts.length, 1);
    assert.deepEqual(posts[0].body, { name: 'trip.booked', data: { trip: 't-1' }, step: 'trip.booked', seq: 0 });
    assert.equal(gateway.events.filter((event) => event.id === ids[0]).length, 1);
  });

  test('needs the gateway and JSON data', LIMIT, async () => {
    await assert.rejects(step.sendEvent('trip.booked', {}), /needs the Stepgate gateway/);
    const run = gateway.createRun();
    const handler = wrap(async () => {
      await assert.rejects(step.sendEvent('x', { big: 1n }), /data must be JSON/);
      await assert.rejects(step.sendEvent('a#b', {}), /must not contain "#"/);
      return new Response('ok');
    });
    assert.equal((await invoke(gateway, run, handler)).status, 200);
  });
});
