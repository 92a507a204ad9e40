// wrapNodeHandler on a real node:http server, driven like the gateway drives an upstream.

import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { after, before, test } from 'node:test';

import { NonRetriableError, step, wrapNodeHandler } from '../src/index.js';
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
 * Serves `handler` (already wrapped, or a raw server callback) on loopback for one test.
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

/** @param {import('node:http').IncomingMessage} req */
async function readJson(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return JSON.parse(Buffer.concat(chunks).toString('utf8'));
}

test('the handler\'s own response passes through untouched', LIMIT, async (t) => {
  const run = gateway.createRun();
  const url = await serve(t, wrapNodeHandler(async (req, res) => {
    const body = await readJson(req);
    const total = await step.run('add', (a, b) => a + b, body.a, body.b);
    res.setHeader('x-total', String(total));
    res.writeHead(201, { 'content-type': 'text/plain' });
    res.end(`total ${total}`);
  }));
  const response = await invoke(gateway, run, url, { body: JSON.stringify({ a: 2, b: 3 }) });
  assert.equal(response.status, 201);
  assert.equal(response.headers.get('x-total'), '5');
  assert.equal(response.headers.get('content-type'), 'text/plain');
  assert.equal(await response.text(), 'total 5');
  assert.deepEqual(gateway.callsOf(run).map((call) => call.body), [{ output: 5, seq: 0 }]);
});

test('a suspension answers 202 with only the suspend header and an empty body', LIMIT, async (t) => {
  const run = gateway.createRun();
  const url = await serve(t, wrapNodeHandler(async (req, res) => {
    res.setHeader('set-cookie', 'session=1');
    res.setHeader('content-type', 'text/html');
    await step.sleep('nap', '1h');
    res.end('unreachable');
  }));
  const response = await invoke(gateway, run, url);
  assert.equal(response.status, 202);
  assert.equal(response.headers.get('stepgate-suspend'), 'true');
  assert.equal(response.headers.get('set-cookie'), null);
  assert.equal(response.headers.get('content-type'), null);
  assert.equal(response.headers.get('content-length'), '0');
  assert.equal(await response.text(), '');
});

test('a handler that swallows the suspension cannot send its own answer', LIMIT, async (t) => {
  const run = gateway.createRun();
  /** @type {Record<string, unknown>} */
  const returned = {};
  const url = await serve(t, wrapNodeHandler(async (req, res) => {
    try {
      await step.sleep('nap', '1h');
    } catch {
      returned.setHeader = res.setHeader('x-oops', '1');
      returned.writeHead = res.writeHead(500);
      returned.write = res.write('partial');
      await new Promise((resolve) => res.end('oops', () => resolve(undefined)));
    }
  }));
  const response = await invoke(gateway, run, url);
  assert.equal(response.status, 202);
  assert.equal(response.headers.get('x-oops'), null);
  assert.equal(await response.text(), '');
  // The silenced writers behave like the real ones for the handler's control flow.
  assert.equal(returned.write, true);
  assert.ok(returned.writeHead && returned.setHeader === returned.writeHead);
});

test('writers patched on the response by middleware are restored and used', LIMIT, async (t) => {
  const run = gateway.createRun();
  /** @type {string[]} */
  const seen = [];
  /** @type {import('node:http').ServerResponse | null} */
  let response = null;
  const handler = wrapNodeHandler(async (req, res) => {
    await step.sleep('nap', '1h').catch(() => {});
    res.end('swallowed');
  });
  const url = await serve(t, (req, res) => {
    response = res;
    // What compression-style middleware does: an own `end` that wraps the prototype's.
    const end = res.end;
    res.end = /** @type {any} */ (function patchedEnd(/** @type {any[]} */ ...args) {
      seen.push(`end ${res.statusCode}`);
      return end.apply(res, /** @type {any} */ (args));
    });
    return handler(req, res);
  });
  const answer = await invoke(gateway, run, url);
  assert.equal(answer.status, 202);
  assert.deepEqual(seen, ['end 202'], 'only the SDK\'s answer went through the middleware');
  const res = /** @type {any} */ (response);
  assert.equal(res.end.name, 'patchedEnd');
  assert.equal(Object.hasOwn(res, 'write'), false, 'no shadow left behind');
  assert.equal(Object.hasOwn(res, 'writeHead'), false);
});

test('NonRetriableError answers its status as problem+json with Stepgate-No-Retry', LIMIT, async (t) => {
  const run = gateway.createRun();
  /** @type {unknown[]} */
  const errors = [];
  const url = await serve(t, wrapNodeHandler(async () => {
    throw new NonRetriableError('no such trip', { status: 404 });
  }, { onError: (error) => errors.push(error) }));
  const response = await invoke(gateway, run, url);
  assert.equal(response.status, 404);
  assert.equal(response.headers.get('content-type'), 'application/problem+json');
  assert.equal(response.headers.get('stepgate-no-retry'), 'true');
  assert.deepEqual(await response.json(),
    { type: 'about:blank', title: 'Not Found', status: 404, detail: 'no such trip' });
  assert.deepEqual(errors, []);
});

test('an unexpected error answers a retriable 500 problem and goes to onError', LIMIT, async (t) => {
  const run = gateway.createRun();
  /** @type {unknown[]} */
  const errors = [];
  const failure = new RangeError('database password is hunter2');
  const url = await serve(t, wrapNodeHandler(async () => {
    throw failure;
  }, { onError: (error) => errors.push(error) }));
  const response = await invoke(gateway, run, url);
  assert.equal(response.status, 500);
  assert.equal(response.headers.get('stepgate-no-retry'), null);
  const text = await response.text();
  assert.doesNotMatch(text, /hunter2/);
  assert.equal(JSON.parse(text).detail, 'unhandled RangeError in the handler');
  assert.deepEqual(errors, [failure]);
});

test('a throwing onError does not break the answer', LIMIT, async (t) => {
  const run = gateway.createRun();
  const url = await serve(t, wrapNodeHandler(() => {
    throw new Error('sync throw');
  }, { onError: () => { throw new Error('reporter broke'); } }));
  const response = await invoke(gateway, run, url);
  assert.equal(response.status, 500);
});

test('a callback-style handler is done when its response ends', LIMIT, async (t) => {
  const run = gateway.createRun();
  const url = await serve(t, wrapNodeHandler((req, res) => {
    // The step starts after the handler returned: the invocation must still be open.
    setTimeout(() => {
      step.run('later', () => 'value').then((value) => res.end(String(value)), (err) => res.end(String(err)));
    }, 20);
  }));
  const response = await invoke(gateway, run, url);
  assert.equal(await response.text(), 'value');
  assert.equal(run.steps.get('later')?.output, 'value');
});

test('a callback-style handler that suspends still answers 202', LIMIT, async (t) => {
  const run = gateway.createRun();
  const url = await serve(t, wrapNodeHandler((req, res) => {
    setTimeout(() => {
      step.sleep('nap', '1h').then(() => res.end('unreachable'), () => { /* dropped */ });
    }, 20);
  }));
  const response = await invoke(gateway, run, url);
  assert.equal(response.status, 202);
  assert.equal(response.headers.get('stepgate-suspend'), 'true');
});

test('extra arguments and `this` reach the handler (Express passes next)', LIMIT, async (t) => {
  /** @type {unknown[]} */
  const seen = [];
  /**
   * @this {unknown}
   * @param {import('node:http').IncomingMessage} req
   * @param {import('node:http').ServerResponse} res
   * @param {unknown} next
   */
  function handler(req, res, next) {
    seen.push(this, next);
    res.end('ok');
  }
  const wrapped = wrapNodeHandler(handler);
  const context = { app: 'express-like' };
  const next = () => {};
  const url = await serve(t, (req, res) => wrapped.call(context, req, res, next));
  assert.equal(await (await fetch(url)).text(), 'ok');
  assert.deepEqual(seen, [context, next]);
});

test('a suspension after the headers went out cuts the connection and is reported', LIMIT, async (t) => {
  const run = gateway.createRun();
  /** @type {unknown[]} */
  const errors = [];
  const url = await serve(t, wrapNodeHandler(async (req, res) => {
    res.writeHead(200, { 'content-type': 'text/plain' });
    res.write('started');
    await step.sleep('nap', '1h');
    res.end('unreachable');
  }, { onError: (error) => errors.push(error) }));
  await assert.rejects(async () => {
    const response = await invoke(gateway, run, url);
    await response.text();
  });
  assert.match(String(errors[0]), /already sent response headers/);
});

test('a whole run through a node server: fail once, retry, sleep, resume', LIMIT, async (t) => {
  const run = gateway.createRun();
  const ran = { reserve: 0, charge: 0 };
  const url = await serve(t, wrapNodeHandler(async (req, res) => {
    const order = await readJson(req);
    const reservation = await step.run('reserve', () => {
      ran.reserve += 1;
      return { id: `R-${order.id}` };
    });
    await step.sleep('settle', '10m');
    const charge = await step.run('charge', () => {
      ran.charge += 1;
      if (ran.charge === 1) throw new Error('gateway timeout at the bank');
      return { ok: true };
    });
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ reservation, charge }));
  }, { onError: () => {} }));
  const result = await drive(gateway, run, url, { body: JSON.stringify({ id: 9 }) });
  assert.deepEqual(result.history.map((entry) => entry.status), [202, 500, 200]);
  assert.deepEqual(JSON.parse(result.text), { reservation: { id: 'R-9' }, charge: { ok: true } });
  assert.deepEqual(ran, { reserve: 1, charge: 2 });
});
