// The step protocol under the gateway, against the in-process fake gateway: ids and positions,
// lazy record, replay, failures, suspension, waits, mismatches, parallel steps.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import {
  CallbackError, GatewayUnavailableError, NonRetriableError, ReplayMismatchError, StepOutputError,
  StepUsageError, isSuspend, step, wrapFetchHandler,
} from '../src/index.js';
import { FakeGateway, drive, invoke } from '../test-support/fake-gateway.js';

// A hung test fails instead of stalling the run.
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
 * A fetch-style handler wrapped with errors collected instead of logged.
 * @param {(request: Request) => Promise<Response>} handler
 */
function wrap(handler) {
  /** @type {unknown[]} */
  const errors = [];
  const wrapped = wrapFetchHandler(handler, { onError: (error) => errors.push(error) });
  return Object.assign(wrapped, { errors });
}

/** @param {import('../test-support/fake-gateway.js').Run} run */
function puts(run) {
  return gateway.callsOf(run).filter((call) => call.method === 'PUT');
}

const sleep = (/** @type {number} */ ms) => new Promise((resolve) => setTimeout(resolve, ms));

describe('gateway mode', () => {
  test('needs both Stepgate-Callback and Stepgate-Token', LIMIT, async () => {
    for (const drop of ['stepgate-callback', 'stepgate-token']) {
      const run = gateway.createRun();
      let ran = 0;
      const handler = wrap(async () => {
        await step.run('work', () => { ran += 1; });
        await assert.rejects(step.waitForEvent('paid', { event: 'order.paid' }), StepUsageError);
        return new Response('local');
      });
      const response = await invoke(gateway, run, handler, { headers: { [drop]: '' } });
      assert.equal(await response.text(), 'local');
      assert.equal(ran, 1);
      assert.deepEqual(gateway.callsOf(run), [], `no callback without ${drop}`);
    }
  });

  test('with both headers every call carries the bearer token', LIMIT, async () => {
    const run = gateway.createRun({ steps: [{ id: 'first', output: 1 }] });
    const handler = wrap(async () => {
      await step.run('first', () => 1);
      await step.run('second', () => 2);
      return new Response('ok');
    });
    await invoke(gateway, run, handler);
    const calls = gateway.callsOf(run);
    assert.deepEqual(calls.map((call) => call.method), ['GET', 'PUT']);
    for (const call of calls) assert.equal(call.authorization, `Bearer ${run.token}`);
  });
});

describe('step ids and positions', () => {
  test('ids are name, name#2, ... per name, seq is the call order, sent in every PUT', LIMIT, async () => {
    const run = gateway.createRun();
    const handler = wrap(async () => {
      await step.run('fetch', () => 'a');
      await step.run('save', () => 'b');
      await step.run('fetch', () => 'c');
      await step.sleep('fetch', 0);
      await step.run('save', () => 'd');
      return new Response('ok');
    });
    await invoke(gateway, run, handler);
    assert.deepEqual(puts(run).map((call) => [call.stepId, call.body.seq]), [
      ['fetch', 0], ['save', 1], ['fetch#2', 2], ['fetch#3', 3], ['save#2', 4],
    ]);
  });

  test('ids are percent-encoded in the URL and arrive intact', LIMIT, async () => {
    const run = gateway.createRun();
    const name = 'charge card/€ 100%?';
    const handler = wrap(async () => {
      await step.run(name, () => 1);
      return new Response('ok');
    });
    await invoke(gateway, run, handler);
    const [call] = puts(run);
    assert.equal(call.stepId, name);
    assert.equal(call.path, `/v1/runs/${run.id}/steps/${encodeURIComponent(name)}`);
  });

  test('ids restart with every invocation', LIMIT, async () => {
    const run = gateway.createRun();
    let attempt = 0;
    const handler = wrap(async () => {
      attempt += 1;
      await step.run('a', () => attempt);
      await step.run('a', () => attempt);
      if (attempt === 1) throw new Error('retry me');
      return new Response('ok');
    });
    const result = await drive(gateway, run, handler);
    assert.equal(result.status, 200);
    assert.deepEqual(gateway.stepsOf(run).map((record) => [record.id, record.output]), [['a', 1], ['a#2', 1]]);
  });

  test('bad names are rejected before they take a position', LIMIT, async () => {
    const run = gateway.createRun();
    const handler = wrap(async () => {
      await assert.rejects(step.run('', () => 1), StepUsageError);
      await assert.rejects(step.run('a#2', () => 1), /must not contain "#"/);
      await assert.rejects(step.run('x'.repeat(249), () => 1), /longer than 248/);
      await assert.rejects(step.run('no-fn', /** @type {any} */ (42)), /needs a function/);
      await assert.rejects(step.sleep('nap', /** @type {any} */ ('5 minutes')), /not a duration/);
      await assert.rejects(step.sleep('nap', -1), /non-negative/);
      await assert.rejects(step.sleepUntil('nap', 'someday'), /valid Date/);
      await assert.rejects(step.waitForEvent('w', /** @type {any} */ ({})), /event must be/);
      await assert.rejects(step.waitForEvent('w', { event: 'e', match: /** @type {any} */ ([]) }), /match/);
      await assert.rejects(step.waitForEvent('w', { event: 'e', timeout: 0 }), /positive timeout/);
      await step.run('ok', () => 1);
      return new Response('ok');
    });
    await invoke(gateway, run, handler);
    assert.deepEqual(puts(run).map((call) => [call.stepId, call.body.seq]), [['ok', 0]]);
  });

  test('the longest name leaves room for the repeat suffix within 256 characters', LIMIT, async () => {
    const run = gateway.createRun();
    const name = 'n'.repeat(248);
    const handler = wrap(async () => {
      await step.run(name, () => 1);
      await step.run(name, () => 2);
      return new Response('ok');
    });
    await invoke(gateway, run, handler);
    assert.deepEqual(puts(run).map((call) => [call.stepId?.length, call.status]), [[248, 201], [250, 201]]);
  });
});

describe('the record', () => {
  test('Stepgate-Steps: 0 makes no call before the first step runs', LIMIT, async () => {
    const run = gateway.createRun();
    /** @type {number | null} */
    let callsWhenStepRan = null;
    const handler = wrap(async () => {
      await step.run('first', () => { callsWhenStepRan = gateway.callsOf(run).length; });
      return new Response('ok');
    });
    await invoke(gateway, run, handler);
    assert.equal(callsWhenStepRan, 0);
    assert.deepEqual(gateway.callsOf(run).map((call) => call.method), ['PUT']);
  });

  test('Stepgate-Steps > 0 fetches the record once, lazily at the first step', LIMIT, async () => {
    const run = gateway.createRun({ steps: [{ id: 'a', output: 'A' }, { id: 'b', output: 'B' }] });
    /** @type {number | null} */
    let callsBeforeFirstStep = null;
    const handler = wrap(async () => {
      callsBeforeFirstStep = gateway.callsOf(run).length;
      const [a, b] = await Promise.all([step.run('a', () => 'x'), step.run('b', () => 'y')]);
      const c = await step.run('c', () => 'C');
      const d = await step.run('d', () => 'D');
      return Response.json([a, b, c, d]);
    });
    const response = await invoke(gateway, run, handler);
    assert.deepEqual(await response.json(), ['A', 'B', 'C', 'D']);
    assert.equal(callsBeforeFirstStep, 0);
    assert.deepEqual(gateway.callsOf(run).map((call) => `${call.method} ${call.stepId}`),
      ['GET null', 'PUT c', 'PUT d']);
  });

  test('a handler that calls no step makes no call even when the run has steps', LIMIT, async () => {
    const run = gateway.createRun({ steps: [{ id: 'a', output: 1 }] });
    const response = await invoke(gateway, run, wrap(async () => new Response('none')));
    assert.equal(await response.text(), 'none');
    assert.deepEqual(gateway.callsOf(run), []);
  });

  test('a missing Stepgate-Steps header fetches the record (never guess "empty")', LIMIT, async () => {
    const run = gateway.createRun({ steps: [{ id: 'a', output: 'recorded' }] });
    let ran = 0;
    const handler = wrap(async () => Response.json(await step.run('a', () => { ran += 1; return 'new'; })));
    const response = await invoke(gateway, run, handler, { headers: { 'stepgate-steps': '' } });
    assert.equal(await response.json(), 'recorded');
    assert.equal(ran, 0);
  });

  test('completed steps return their recorded output without running', LIMIT, async () => {
    const output = { user: { id: 7, tags: ['a'] }, when: '2024-01-01T00:00:00.000Z' };
    const run = gateway.createRun({ steps: [{ id: 'load', output }, { id: 'nothing', output: null }] });
    let ran = 0;
    const handler = wrap(async () => {
      const loaded = await step.run('load', () => { ran += 1; });
      const nothing = await step.run('nothing', () => { ran += 1; return 'x'; });
      return Response.json({ loaded, nothing });
    });
    const response = await invoke(gateway, run, handler);
    assert.deepEqual(await response.json(), { loaded: output, nothing: null });
    assert.equal(ran, 0);
    assert.deepEqual(puts(run), []);
  });

  test('failed steps run again and their output is stored', LIMIT, async () => {
    const run = gateway.createRun({
      steps: [{ id: 'ok', output: 1 }, { id: 'flaky', status: 'failed', error: { message: 'x' } }],
    });
    let ran = 0;
    const handler = wrap(async () => {
      await step.run('ok', () => 1);
      return Response.json(await step.run('flaky', () => { ran += 1; return 'fixed'; }));
    });
    const response = await invoke(gateway, run, handler);
    assert.equal(await response.json(), 'fixed');
    assert.equal(ran, 1);
    assert.deepEqual(puts(run).map((call) => call.body), [{ output: 'fixed', seq: 1 }]);
    const record = run.steps.get('flaky');
    assert.equal(record?.status, 'completed');
    assert.equal(record?.attempts, 2);
  });

  test('the first stored output wins over a concurrent one', LIMIT, async () => {
    // The record already holds 'first' but this invocation was told Steps: 0, like a race.
    const run = gateway.createRun({ steps: [{ id: 'pick', output: 'first' }] });
    const handler = wrap(async () => Response.json(await step.run('pick', () => 'second')));
    const response = await invoke(gateway, run, handler, { headers: { 'stepgate-steps': '0' } });
    assert.equal(await response.json(), 'first');
    assert.equal(puts(run)[0].status, 200);
  });

  test('outputs go through JSON, the same on the first run and on replay', LIMIT, async () => {
    const run = gateway.createRun();
    const when = new Date('2024-05-06T07:08:09.000Z');
    /** @type {unknown[]} */
    const seen = [];
    let attempt = 0;
    const handler = wrap(async () => {
      attempt += 1;
      seen.push(await step.run('when', () => when));
      seen.push(await step.run('nothing', () => undefined));
      seen.push(await step.run('sparse', () => ({ a: 1, b: undefined })));
      if (attempt === 1) throw new Error('again');
      return new Response('ok');
    });
    await drive(gateway, run, handler);
    const expected = ['2024-05-06T07:08:09.000Z', null, { a: 1 }];
    assert.deepEqual(seen, [...expected, ...expected]);
    assert.deepEqual(puts(run).map((call) => call.body.output), expected);
  });
});

describe('step errors', () => {
  class PaymentDeclined extends Error {}

  test('are recorded as retriable and rethrown as the same object', LIMIT, async () => {
    const run = gateway.createRun();
    const thrown = new PaymentDeclined('card declined');
    /** @type {unknown} */
    let caught;
    const handler = wrap(async () => {
      try {
        await step.run('charge', () => { throw thrown; });
      } catch (err) {
        caught = err;
      }
      return new Response('handled');
    });
    const response = await invoke(gateway, run, handler);
    assert.equal(await response.text(), 'handled');
    assert.equal(caught, thrown);
    assert.deepEqual(puts(run).map((call) => call.body), [
      { error: { message: 'card declined', type: 'PaymentDeclined', retriable: true }, seq: 0 },
    ]);
  });

  test('uncaught, they answer a retriable 500 problem and are reported', LIMIT, async () => {
    const run = gateway.createRun();
    const handler = wrap(async () => {
      await step.run('boom', () => { throw new TypeError('secret internals'); });
      return new Response('unreachable');
    });
    const response = await invoke(gateway, run, handler);
    assert.equal(response.status, 500);
    assert.equal(response.headers.get('content-type'), 'application/problem+json');
    assert.equal(response.headers.get('stepgate-no-retry'), null);
    const problem = await response.json();
    assert.deepEqual(problem, {
      type: 'about:blank', title: 'Internal Server Error', status: 500,
      detail: 'unhandled TypeError in the handler',
    });
    assert.equal(handler.errors.length, 1);
    assert.match(String(handler.errors[0]), /secret internals/);
  });

  test('non-Error throws are recorded with a readable message and type', LIMIT, async () => {
    const run = gateway.createRun();
    const handler = wrap(async () => {
      await step.run('odd', () => { throw 'plain string'; }).catch(() => {});
      await step.run('odder', () => { throw { message: 'object message' }; }).catch(() => {});
      return new Response('ok');
    });
    await invoke(gateway, run, handler);
    assert.deepEqual(puts(run).map((call) => call.body.error), [
      { message: 'plain string', type: 'string', retriable: true },
      { message: 'object message', type: 'object', retriable: true },
    ]);
  });

  test('a retried run re-runs only the failed step', LIMIT, async () => {
    const run = gateway.createRun();
    const ran = { before: 0, flaky: 0, after: 0 };
    const handler = wrap(async () => {
      await step.run('before', () => { ran.before += 1; });
      await step.run('flaky', () => {
        ran.flaky += 1;
        if (ran.flaky < 3) throw new Error(`failure ${ran.flaky}`);
        return 'done';
      });
      await step.run('after', () => { ran.after += 1; });
      return new Response('ok');
    });
    const result = await drive(gateway, run, handler);
    assert.equal(result.status, 200);
    assert.deepEqual(result.history.map((entry) => entry.status), [500, 500, 200]);
    assert.deepEqual(ran, { before: 1, flaky: 3, after: 1 });
    assert.equal(run.steps.get('flaky')?.attempts, 3);
  });

  test('NonRetriableError records retriable false and answers its status without retry', LIMIT, async () => {
    const run = gateway.createRun();
    const handler = wrap(async () => {
      await step.run('validate', () => { throw new NonRetriableError('card number invalid', { status: 422 }); });
      return new Response('unreachable');
    });
    const result = await drive(gateway, run, handler);
    assert.equal(result.status, 422);
    assert.equal(result.history.length, 1);
    assert.equal(result.headers.get('stepgate-no-retry'), 'true');
    assert.equal(result.headers.get('content-type'), 'application/problem+json');
    assert.deepEqual(JSON.parse(result.text), {
      type: 'about:blank', title: 'Unprocessable Entity', status: 422, detail: 'card number invalid',
    });
    assert.deepEqual(puts(run)[0].body.error,
      { message: 'card number invalid', type: 'NonRetriableError', retriable: false });
    assert.equal(run.noRetry, true);
    assert.deepEqual(handler.errors, [], 'a deliberate NonRetriableError is not reported');
  });

  test('NonRetriableError from the handler itself defaults to 500', LIMIT, async () => {
    const run = gateway.createRun();
    const handler = wrap(async () => {
      throw new NonRetriableError('cannot work');
    });
    const response = await invoke(gateway, run, handler);
    assert.equal(response.status, 500);
    assert.equal(response.headers.get('stepgate-no-retry'), 'true');
    assert.equal((await response.json()).detail, 'cannot work');
    assert.deepEqual(gateway.callsOf(run), []);
  });

  test('a step whose output is not JSON fails for good', LIMIT, async () => {
    const run = gateway.createRun();
    const handler = wrap(async () => {
      await step.run('big', () => 10n);
      return new Response('unreachable');
    });
    const result = await drive(gateway, run, handler);
    assert.equal(result.status, 500);
    assert.equal(result.history.length, 1);
    assert.equal(result.headers.get('stepgate-no-retry'), 'true');
    assert.match(JSON.parse(result.text).detail, /step "big" returned a value that is not JSON/);
    assert.equal(puts(run)[0].body.error.retriable, false);
    assert.ok(handler.errors[0] instanceof StepOutputError);
  });

  test('nested steps are rejected and fail the outer step for good', LIMIT, async () => {
    const run = gateway.createRun();
    const handler = wrap(async () => {
      await step.run('outer', () => step.run('inner', () => 1));
      return new Response('unreachable');
    });
    const response = await invoke(gateway, run, handler);
    assert.equal(response.status, 500);
    assert.equal(response.headers.get('stepgate-no-retry'), 'true');
    assert.match((await response.json()).detail, /"inner" was called inside step "outer"/);
    assert.deepEqual(puts(run).map((call) => [call.stepId, call.body.error?.retriable]), [['outer', false]]);
  });
});

describe('sleep', () => {
  test('suspends with 202 and Stepgate-Suspend, and stores the deadline', LIMIT, async () => {
    const run = gateway.createRun();
    let reachedEnd = false;
    const handler = wrap(async () => {
      await step.sleep('cool-off', '1h');
      reachedEnd = true;
      return new Response('done');
    });
    const before = Date.now();
    const response = await invoke(gateway, run, handler);
    assert.equal(response.status, 202);
    assert.equal(response.headers.get('stepgate-suspend'), 'true');
    assert.equal(await response.text(), '');
    assert.equal(reachedEnd, false);
    const [call] = puts(run);
    assert.equal(call.body.seq, 0);
    assert.match(call.body.sleep.until, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$/);
    const until = Date.parse(call.body.sleep.until);
    assert.ok(until >= before + 3_600_000 && until <= Date.now() + 3_600_000, call.body.sleep.until);
  });

  test('a parked run resumes after the sleep without re-running earlier steps', LIMIT, async () => {
    const run = gateway.createRun();
    const ran = { before: 0, after: 0 };
    const handler = wrap(async () => {
      await step.run('before', () => { ran.before += 1; });
      await step.sleep('nap', 60_000);
      await step.run('after', () => { ran.after += 1; });
      return new Response('done');
    });
    const result = await drive(gateway, run, handler);
    assert.equal(result.text, 'done');
    assert.deepEqual(result.history.map((entry) => entry.status), [202, 200]);
    assert.deepEqual(ran, { before: 1, after: 1 });
  });

  test('a recorded sleep that is still sleeping suspends again without a PUT', LIMIT, async () => {
    const run = gateway.createRun({
      steps: [{ id: 'a', output: 1 }, { id: 'nap', kind: 'sleep', status: 'sleeping' }],
    });
    const handler = wrap(async () => {
      await step.run('a', () => 1);
      await step.sleep('nap', '1h');
      return new Response('unreachable');
    });
    const response = await invoke(gateway, run, handler);
    assert.equal(response.status, 202);
    assert.deepEqual(gateway.callsOf(run).map((call) => call.method), ['GET']);
  });

  test('a sleep that is already due continues in the same invocation', LIMIT, async () => {
    const run = gateway.createRun();
    const handler = wrap(async () => {
      await step.sleep('zero', 0);
      await step.sleepUntil('past', new Date(Date.now() - 1000));
      return new Response('went on');
    });
    const response = await invoke(gateway, run, handler);
    assert.equal(await response.text(), 'went on');
    assert.equal(puts(run).length, 2);
  });

  test('sleepUntil sends the given instant', LIMIT, async () => {
    const run = gateway.createRun();
    const handler = wrap(async () => {
      await step.sleepUntil('date', new Date('2999-01-02T03:04:05.678Z'));
      return new Response('unreachable');
    });
    await invoke(gateway, run, handler);
    const run2 = gateway.createRun();
    await invoke(gateway, run2, wrap(async () => {
      await step.sleepUntil('text', '2999-01-02T05:04:05.678+02:00');
      return new Response('unreachable');
    }));
    assert.equal(puts(run)[0].body.sleep.until, '2999-01-02T03:04:05.678+00:00');
    assert.equal(puts(run2)[0].body.sleep.until, '2999-01-02T03:04:05.678+00:00');
  });
});

describe('waitForEvent', () => {
  test('registers the wait and resumes with the matching event', LIMIT, async () => {
    const run = gateway.createRun();
    const handler = wrap(async () => {
      const event = await step.waitForEvent('paid', {
        event: 'order.paid', match: { 'data.order_id': 'o-17' }, timeout: '1.5h',
      });
      return Response.json(event);
    });
    let sent;
    const result = await drive(gateway, run, handler, {
      beforeResume: () => {
        gateway.sendEvent('order.paid', { order_id: 'other' });
        sent = gateway.sendEvent('order.paid', { order_id: 'o-17' });
      },
    });
    assert.deepEqual(puts(run)[0].body, {
      wait: { event: 'order.paid', match: { 'data.order_id': 'o-17' }, timeout: '5400s' }, seq: 0,
    });
    assert.deepEqual(result.history.map((entry) => entry.status), [202, 200]);
    assert.deepEqual(JSON.parse(result.text), sent);
  });

  test('resolves with null when the wait timed out', LIMIT, async () => {
    const run = gateway.createRun();
    const handler = wrap(async () => Response.json({ event: await step.waitForEvent('w', { event: 'never' }) }));
    const result = await drive(gateway, run, handler);
    assert.deepEqual(JSON.parse(result.text), { event: null });
    assert.deepEqual(puts(run)[0].body, { wait: { event: 'never', match: {} }, seq: 0 });
  });

  test('an event that arrived first completes the wait at once', LIMIT, async () => {
    const event = gateway.sendEvent('early.bird', { n: 1 });
    const run = gateway.createRun();
    const handler = wrap(async () => Response.json(await step.waitForEvent('w', {
      event: 'early.bird', match: { 'data.n': 1 }, timeout: 30_000,
    })));
    const result = await drive(gateway, run, handler);
    assert.deepEqual(result.history.map((entry) => entry.status), [200]);
    assert.deepEqual(JSON.parse(result.text), event);
    assert.equal(puts(run)[0].body.wait.timeout, '30s');
  });

  test('a recorded wait still waiting suspends again; a completed one returns its output', LIMIT, async () => {
    const waiting = gateway.createRun({ steps: [{ id: 'w', kind: 'wait', status: 'waiting' }] });
    const done = gateway.createRun({ steps: [{ id: 'w', kind: 'wait', output: { name: 'e' } }] });
    const handler = wrap(async () => Response.json(await step.waitForEvent('w', { event: 'e' })));
    assert.equal((await invoke(gateway, waiting, handler)).status, 202);
    assert.deepEqual(await (await invoke(gateway, done, handler)).json(), { name: 'e' });
    assert.deepEqual(puts(waiting), []);
    assert.deepEqual(puts(done), []);
  });
});

describe('suspension is sticky', () => {
  test('the signal is not an Error and isSuspend recognises it', LIMIT, async () => {
    const run = gateway.createRun();
    /** @type {unknown} */
    let caught;
    const handler = wrap(async () => {
      try {
        await step.sleep('nap', '1h');
      } catch (err) {
        caught = err;
        throw err;
      }
      return new Response('unreachable');
    });
    await invoke(gateway, run, handler);
    assert.equal(isSuspend(caught), true);
    assert.equal(caught instanceof Error, false);
    assert.match(String(caught), /suspended at step "nap"/);
    assert.equal(isSuspend(new Error('x')), false);
    assert.deepEqual(handler.errors, [], 'suspension is not reported as an error');
  });

  test('a handler that swallows the signal still answers 202', LIMIT, async () => {
    const run = gateway.createRun();
    const handler = wrap(async () => {
      try {
        await step.sleep('nap', '1h');
      } catch {
        return new Response('swallowed', { status: 200 });
      }
      return new Response('unreachable');
    });
    const response = await invoke(gateway, run, handler);
    assert.equal(response.status, 202);
    assert.equal(response.headers.get('stepgate-suspend'), 'true');
    assert.equal(await response.text(), '');
  });

  test('steps called after the suspension throw the signal and do not run', LIMIT, async () => {
    const run = gateway.createRun();
    let ran = 0;
    /** @type {unknown} */
    let later;
    const handler = wrap(async () => {
      await step.sleep('nap', '1h').catch(() => {});
      try {
        await step.run('after', () => { ran += 1; });
      } catch (err) {
        later = err;
      }
      return new Response('swallowed');
    });
    const response = await invoke(gateway, run, handler);
    assert.equal(response.status, 202);
    assert.equal(ran, 0);
    assert.equal(isSuspend(later), true);
    assert.deepEqual(puts(run).map((call) => call.stepId), ['nap']);
  });
});

describe('replay mismatch', () => {
  const recorded = [{ id: 'reserve', output: 1 }, { id: 'charge', output: 2 }];

  test('another step at a recorded position answers 500 with Stepgate-No-Retry', LIMIT, async () => {
    const run = gateway.createRun({ steps: recorded });
    let ran = 0;
    const handler = wrap(async () => {
      await step.run('reserve', () => 1);
      await step.run('refund', () => { ran += 1; });
      return new Response('unreachable');
    });
    const result = await drive(gateway, run, handler);
    assert.equal(result.status, 500);
    assert.equal(result.history.length, 1);
    assert.equal(result.headers.get('stepgate-no-retry'), 'true');
    const { detail } = JSON.parse(result.text);
    assert.match(detail, /"refund"/);
    assert.match(detail, /"charge"/);
    assert.equal(ran, 0);
    const [error] = handler.errors;
    assert.ok(error instanceof ReplayMismatchError);
    assert.equal(error.runId, run.id);
    assert.equal(error.seq, 1);
    assert.equal(error.stepId, 'refund');
    assert.equal(error.recordedId, 'charge');
  });

  test('a recorded step called at another position is a mismatch', LIMIT, async () => {
    const run = gateway.createRun({ steps: [{ id: 'late', seq: 3, output: 1 }] });
    const handler = wrap(async () => Response.json(await step.run('late', () => 2)));
    const response = await invoke(gateway, run, handler);
    assert.equal(response.status, 500);
    const [error] = handler.errors;
    assert.ok(error instanceof ReplayMismatchError);
    assert.equal(error.recordedId, null);
    assert.equal(error.recordedSeq, 3);
    assert.match(error.message, /called "late" at step position 0 but the run recorded it at position 3/);
  });

  test('the same id recorded as another kind of step is a mismatch', LIMIT, async () => {
    const run = gateway.createRun({ steps: [{ id: 'x', kind: 'sleep', status: 'sleeping' }] });
    const handler = wrap(async () => Response.json(await step.run('x', () => 1)));
    const response = await invoke(gateway, run, handler);
    assert.equal(response.status, 500);
    assert.match((await response.json()).detail, /called as a run step but the run recorded a sleep step/);
  });

  test('a handler that catches the mismatch still answers 500 without retry', LIMIT, async () => {
    const run = gateway.createRun({ steps: recorded });
    const handler = wrap(async () => {
      try {
        await step.run('other', () => 1);
      } catch {
        // Swallowed on purpose.
      }
      return new Response('fine?');
    });
    const response = await invoke(gateway, run, handler);
    assert.equal(response.status, 500);
    assert.equal(response.headers.get('stepgate-no-retry'), 'true');
    assert.equal(handler.errors.length, 1, 'the swallowed mismatch is still reported');
  });

  test('a NonRetriableError that ends the handler wins over a parallel suspension', LIMIT, async () => {
    const run = gateway.createRun();
    const handler = wrap(async () => {
      await Promise.all([
        step.sleep('nap', '1h'),
        step.run('check', async () => {
          await sleep(10);
          throw new NonRetriableError('declined', { status: 402 });
        }),
      ].map((operation) => operation.catch((err) => {
        if (err instanceof NonRetriableError) throw err;
      })));
      return new Response('unreachable');
    });
    const response = await invoke(gateway, run, handler);
    assert.equal(response.status, 402);
    assert.equal(response.headers.get('stepgate-no-retry'), 'true');
    assert.equal(run.steps.get('nap')?.status, 'sleeping');
  });

  test('a mismatch wins over a suspension in a parallel branch', LIMIT, async () => {
    const run = gateway.createRun({ steps: [{ id: 'a', output: 1 }] });
    const handler = wrap(async () => {
      await Promise.all([step.run('b', () => 1), step.sleep('nap', '1h')]);
      return new Response('unreachable');
    });
    const response = await invoke(gateway, run, handler);
    assert.equal(response.status, 500);
    assert.equal(response.headers.get('stepgate-no-retry'), 'true');
  });
});

describe('parallel steps', () => {
  test('Promise.all steps get ids and positions in call order, whatever finishes first', LIMIT, async () => {
    const run = gateway.createRun();
    let ran = 0;
    const handler = wrap(async () => {
      const results = await Promise.all([
        step.run('fetch', async () => { ran += 1; await sleep(30); return 'slow'; }),
        step.run('other', async () => { ran += 1; return 'fast'; }),
        step.run('fetch', async () => { ran += 1; await sleep(10); return 'medium'; }),
      ]);
      return Response.json(results);
    });
    const first = await invoke(gateway, run, handler);
    assert.deepEqual(await first.json(), ['slow', 'fast', 'medium']);
    assert.deepEqual(puts(run).map((call) => [call.stepId, call.body.seq]),
      [['other', 1], ['fetch#2', 2], ['fetch', 0]]);
    const replay = await invoke(gateway, run, handler);
    assert.deepEqual(await replay.json(), ['slow', 'fast', 'medium']);
    assert.equal(ran, 3, 'the replay ran nothing');
    assert.equal(gateway.callsOf(run).filter((call) => call.method === 'GET').length, 1);
  });

  test('every parallel sleep and wait is registered before the 202', LIMIT, async () => {
    const run = gateway.createRun();
    const handler = wrap(async () => {
      await Promise.all([
        step.sleep('short', '1s'),
        step.waitForEvent('approval', { event: 'trip.approved' }),
        step.sleep('long', '1d'),
      ]);
      return new Response('done');
    });
    const response = await invoke(gateway, run, handler);
    assert.equal(response.status, 202);
    assert.deepEqual(gateway.stepsOf(run).map((record) => [record.id, record.status]),
      [['short', 'sleeping'], ['approval', 'waiting'], ['long', 'sleeping']]);
  });

  test('a running step finishes and is recorded before the 202, and is not re-run', LIMIT, async () => {
    const run = gateway.createRun();
    let ran = 0;
    const handler = wrap(async () => {
      const [, value] = await Promise.all([
        step.sleep('nap', '1h'),
        step.run('slow', async () => { ran += 1; await sleep(50); return 'kept'; }),
      ]);
      return Response.json(value);
    });
    const first = await invoke(gateway, run, handler);
    assert.equal(first.status, 202);
    assert.equal(run.steps.get('slow')?.output, 'kept');
    const result = await drive(gateway, run, handler);
    assert.equal(JSON.parse(result.text), 'kept');
    assert.equal(ran, 1);
  });

  test('the answer waits for steps the handler did not await', LIMIT, async () => {
    const run = gateway.createRun();
    const handler = wrap(async () => {
      void step.run('background', async () => { await sleep(40); return 'late'; });
      return new Response('early');
    });
    const response = await invoke(gateway, run, handler);
    assert.equal(await response.text(), 'early');
    assert.equal(run.steps.get('background')?.output, 'late');
  });

  test('a step started after the answer is rejected', LIMIT, async () => {
    const run = gateway.createRun();
    /** @type {Promise<unknown>} */
    let late = Promise.resolve();
    const handler = wrap(async () => {
      late = new Promise((resolve) => {
        setTimeout(() => resolve(step.run('too-late', () => 1).catch((err) => err)), 20);
      });
      return new Response('done');
    });
    await invoke(gateway, run, handler);
    const error = await late;
    assert.ok(error instanceof StepUsageError);
    assert.match(error.message, /after the handler's answer/);
    assert.deepEqual(puts(run), []);
  });
});

describe('callback failures', () => {
  test('an error answer becomes a CallbackError and a retriable 500', LIMIT, async () => {
    const run = gateway.createRun();
    gateway.intercept = ({ method }) => (method === 'PUT'
      ? { status: 503, body: { type: 'about:blank', title: 'Service Unavailable', status: 503, detail: 'shutting down' } }
      : undefined);
    try {
      const handler = wrap(async () => Response.json(await step.run('a', () => 1)));
      const response = await invoke(gateway, run, handler);
      assert.equal(response.status, 500);
      assert.equal(response.headers.get('stepgate-no-retry'), null);
      const [error] = handler.errors;
      assert.ok(error instanceof CallbackError);
      assert.equal(error.status, 503);
      assert.equal(error.stepId, 'a');
      assert.equal(error.method, 'PUT');
      assert.deepEqual(/** @type {any} */ (error.problem).detail, 'shutting down');
      assert.match(error.message, /answered 503: shutting down/);
    } finally {
      gateway.intercept = null;
    }
  });

  test('a wrong token is a 401 CallbackError that does not leak the token', LIMIT, async () => {
    const run = gateway.createRun();
    const handler = wrap(async () => Response.json(await step.run('a', () => 1)));
    const response = await invoke(gateway, run, handler, { headers: { 'stepgate-token': 'forged' } });
    assert.equal(response.status, 500);
    const [error] = handler.errors;
    assert.ok(error instanceof CallbackError);
    assert.equal(error.status, 401);
    assert.doesNotMatch(error.message, /forged/);
  });

  test('a dropped connection is retried', LIMIT, async () => {
    const run = gateway.createRun();
    let dropped = 0;
    gateway.intercept = ({ method }) => {
      if (method === 'PUT' && dropped < 2) {
        dropped += 1;
        return 'destroy';
      }
      return undefined;
    };
    try {
      const handler = wrap(async () => Response.json(await step.run('a', () => 'stored')));
      const response = await invoke(gateway, run, handler);
      assert.equal(await response.json(), 'stored');
      assert.equal(puts(run).length, 3);
      assert.equal(run.steps.get('a')?.output, 'stored');
    } finally {
      gateway.intercept = null;
    }
  });

  test('an unreachable gateway fails the step with a CallbackError naming the cause', LIMIT, async () => {
    const closed = await FakeGateway.start();
    const run = closed.createRun();
    await closed.close();
    const handler = wrap(async () => Response.json(await step.run('a', () => 1)));
    const response = await invoke(closed, run, handler);
    assert.equal(response.status, 500);
    const [error] = handler.errors;
    assert.ok(error instanceof GatewayUnavailableError && error instanceof CallbackError);
    assert.equal(error.status, null);
    assert.match(error.message, /ECONNREFUSED|fetch failed/);
  });

  test('an unexpected answer body is a CallbackError', LIMIT, async () => {
    const run = gateway.createRun();
    gateway.intercept = ({ method }) => (method === 'PUT' ? { status: 200, body: { status: 'sleeping' } } : undefined);
    try {
      const handler = wrap(async () => Response.json(await step.run('a', () => 1)));
      const response = await invoke(gateway, run, handler);
      assert.equal(response.status, 500);
      assert.match(String(handler.errors[0]), /unexpected body/);
    } finally {
      gateway.intercept = null;
    }
  });
});
