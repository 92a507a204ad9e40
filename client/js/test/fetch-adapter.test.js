// wrapFetchHandler specifics; the step protocol itself is covered in protocol.test.js.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { NonRetriableError, step, wrapFetchHandler } from '../src/index.js';
import { FakeGateway, invoke } from '../test-support/fake-gateway.js';

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

test('the handler\'s Response is returned as is', LIMIT, async () => {
  const run = gateway.createRun();
  const own = new Response('body', { status: 201, headers: { 'x-own': '1' } });
  const handler = wrapFetchHandler(async (request) => {
    await step.run('a', () => request.method);
    return own;
  });
  const response = await invoke(gateway, run, handler);
  assert.equal(response, own);
  assert.equal(run.steps.get('a')?.output, 'POST');
});

test('extra arguments and `this` reach the handler (env, ctx in workers)', LIMIT, async () => {
  /** @type {unknown[]} */
  const seen = [];
  /**
   * @this {unknown}
   * @param {Request} request
   * @param {unknown} env
   * @param {unknown} ctx
   */
  function fetchHandler(request, env, ctx) {
    seen.push(this, env, ctx);
    return new Response('ok');
  }
  const handler = wrapFetchHandler(fetchHandler);
  const app = { fetch: handler };
  const env = { SECRET: 'x' };
  const ctx = { waitUntil() {} };
  const response = await app.fetch(new Request('http://upstream.test/'), env, ctx);
  assert.equal(await response.text(), 'ok');
  assert.deepEqual(seen, [app, env, ctx]);
});

test('a suspension discards the handler\'s Response and answers 202', LIMIT, async () => {
  const run = gateway.createRun();
  let cancelled = false;
  const handler = wrapFetchHandler(async () => {
    await step.sleep('nap', '1h').catch(() => {});
    const body = new ReadableStream({ cancel() { cancelled = true; } });
    return new Response(body, { status: 200 });
  });
  const response = await invoke(gateway, run, handler);
  assert.equal(response.status, 202);
  assert.equal(response.headers.get('stepgate-suspend'), 'true');
  assert.equal(await response.text(), '');
  assert.equal(cancelled, true, 'the discarded body stream was released');
});

test('NonRetriableError and unexpected errors become problem responses', LIMIT, async () => {
  /** @type {unknown[]} */
  const errors = [];
  const teapot = wrapFetchHandler(() => {
    throw new NonRetriableError('short and stout', { status: 418 });
  }, { onError: (error) => errors.push(error) });
  const response = await teapot(new Request('http://upstream.test/'));
  assert.equal(response.status, 418);
  assert.equal(response.headers.get('stepgate-no-retry'), 'true');
  assert.deepEqual(await response.json(),
    { type: 'about:blank', title: "I'm a Teapot", status: 418, detail: 'short and stout' });

  const broken = wrapFetchHandler(async () => {
    throw null;
  }, { onError: (error) => errors.push(error) });
  const failed = await broken(new Request('http://upstream.test/'));
  assert.equal(failed.status, 500);
  assert.equal((await failed.json()).detail, 'unhandled thrown null in the handler');
  assert.deepEqual(errors, [null]);
});

test('wrappers reject a non-function at wrap time', LIMIT, () => {
  assert.throws(() => wrapFetchHandler(/** @type {any} */ ('nope')), TypeError);
});
