// The trip-booking example (examples/js/trip_service.mjs) behind the fake gateway and alone.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { fileURLToPath } from 'node:url';
import { after, before, test } from 'node:test';

import { STEPS, createTripService } from '../../../examples/js/trip_service.mjs';
import { FakeGateway, drive } from '../test-support/fake-gateway.js';

// A hung test fails instead of stalling the run.
const LIMIT = { timeout: 20_000 };

const SCRIPT = fileURLToPath(new URL('../../../examples/js/trip_service.mjs', import.meta.url));
const TRIP = JSON.stringify({ traveller: 'Ada Lovelace', flight: 'LH 1234', hotel: 'Hotel Adlon' });

/** @type {FakeGateway} */
let gateway;
/** @type {import('node:http').Server} */
let server;
/** @type {Record<string, number>} */
let executions;
let base = '';
before(async () => {
  gateway = await FakeGateway.start();
  ({ server, executions } = createTripService({ onError: () => {} }));
  await new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(undefined)));
  base = `http://127.0.0.1:${/** @type {import('node:net').AddressInfo} */ (server.address()).port}`;
});
after(async () => {
  server.closeAllConnections();
  await new Promise((resolve) => server.close(() => resolve(undefined)));
  await gateway.close();
});

/** Executions since `before`, per step. */
function delta(/** @type {Record<string, number>} */ before) {
  return Object.fromEntries(STEPS.map((name) => [name, executions[name] - before[name]]));
}

test('?fail=charge-card: the retry re-runs only charge-card and keeps earlier references', LIMIT, async () => {
  const start = { ...executions };
  const run = gateway.createRun();
  const result = await drive(gateway, run, `${base}/trips?fail=charge-card`, { body: TRIP });
  assert.equal(result.status, 200);
  assert.deepEqual(result.history.map((entry) => entry.status), [500, 200]);
  assert.deepEqual(delta(start),
    { 'reserve-flight': 1, 'reserve-hotel': 1, 'charge-card': 2, 'send-confirmation': 1, 'refund-flight': 0 });
  const trip = JSON.parse(result.text);
  assert.equal(trip.traveller, 'Ada Lovelace');
  assert.equal(trip.flight.reference, /** @type {any} */ (run.steps.get('reserve-flight')?.output).reference);
  assert.match(trip.confirmation.text, new RegExp(trip.charge.reference));
  assert.deepEqual(gateway.stepsOf(run).map((record) => record.id), STEPS.slice(0, 4));
});

test('?fail=charge-card:always: every attempt fails at charge-card, nothing else re-runs', LIMIT, async () => {
  const start = { ...executions };
  const run = gateway.createRun();
  const result = await drive(gateway, run, `${base}/trips?fail=charge-card:always`, { body: TRIP, attempts: 4 });
  assert.equal(result.status, 500);
  assert.equal(result.history.length, 4);
  assert.deepEqual(delta(start),
    { 'reserve-flight': 1, 'reserve-hotel': 1, 'charge-card': 4, 'send-confirmation': 0, 'refund-flight': 0 });
});

test('?cooloff parks the run before charge-card; nothing runs twice', LIMIT, async () => {
  const start = { ...executions };
  const run = gateway.createRun();
  const result = await drive(gateway, run, `${base}/trips?cooloff=90&fail=send-confirmation`, { body: TRIP });
  assert.equal(result.status, 200);
  assert.deepEqual(result.history.map((entry) => entry.status), [202, 500, 200]);
  assert.deepEqual(delta(start),
    { 'reserve-flight': 1, 'reserve-hotel': 1, 'charge-card': 1, 'send-confirmation': 2, 'refund-flight': 0 });
  const pause = run.steps.get('cool-off');
  assert.equal(pause?.kind, 'sleep');
  assert.equal(pause?.seq, 2);
  const bad = await fetch(`${base}/trips?cooloff=forever`, { method: 'POST', body: TRIP });
  assert.equal(bad.status, 400);
});

test('?fail=reserve-hotel:always: the hotel fails for good, the flight is refunded, 409', LIMIT, async () => {
  const start = { ...executions };
  const run = gateway.createRun();
  const result = await drive(gateway, run, `${base}/trips?fail=reserve-hotel:always`, { body: TRIP });
  assert.equal(result.status, 409);
  // The fake gateway retries at once; its policy is the hotel step's own 3 attempts.
  assert.deepEqual(result.history.map((entry) => entry.status), [500, 500, 409]);
  assert.deepEqual(delta(start),
    { 'reserve-flight': 1, 'reserve-hotel': 3, 'charge-card': 0, 'send-confirmation': 0, 'refund-flight': 1 });
  const answer = JSON.parse(result.text);
  assert.match(answer.error, /^no hotel: reserve-hotel failed/);
  assert.equal(answer.refund.flight, /** @type {any} */ (run.steps.get('reserve-flight')?.output).reference);
  const hotel = run.steps.get('reserve-hotel');
  assert.equal(hotel?.final, true);
  assert.deepEqual(hotel?.policy, { attempts: 3, initial: '100ms', max: '400ms', multiplier: 2 });
});

test('?announce=1: trip.booked is sent once though the run is replayed', LIMIT, async () => {
  const sentBefore = gateway.events.length;
  const run = gateway.createRun();
  const result = await drive(gateway, run, `${base}/trips?announce=1&fail=send-confirmation`, { body: TRIP });
  assert.equal(result.status, 200);
  assert.deepEqual(result.history.map((entry) => entry.status), [500, 200]);
  const sent = gateway.events.slice(sentBefore);
  assert.equal(sent.length, 1);
  assert.equal(sent[0].name, 'trip.booked');
  assert.equal(JSON.parse(result.text).announced, sent[0].id);
  assert.equal(run.steps.get('trip.booked')?.kind, 'event');
});

test('TRIP_FAIL adds failures to every request', LIMIT, async (t) => {
  process.env.TRIP_FAIL = 'reserve-flight,send-confirmation:always';
  t.after(() => { delete process.env.TRIP_FAIL; });
  const start = { ...executions };
  const run = gateway.createRun();
  const result = await drive(gateway, run, `${base}/trips`, { body: TRIP, attempts: 3 });
  assert.equal(result.status, 500);
  assert.deepEqual(delta(start),
    { 'reserve-flight': 2, 'reserve-hotel': 1, 'charge-card': 1, 'send-confirmation': 2, 'refund-flight': 0 });
});

test('GET /stats reports the counters; bad input is a 400 that is not retried', LIMIT, async () => {
  const stats = await (await fetch(`${base}/stats`)).json();
  assert.deepEqual(stats, executions);
  const run = gateway.createRun();
  const result = await drive(gateway, run, `${base}/trips`, { body: JSON.stringify({ traveller: 'x' }) });
  assert.equal(result.status, 400);
  assert.equal(result.headers.get('stepgate-no-retry'), 'true');
  assert.match(JSON.parse(result.text).detail, /"flight"/);
  const unknown = await fetch(`${base}/trips?fail=teleport`, { method: 'POST', body: TRIP });
  assert.equal(unknown.status, 400);
});

test('without the gateway every request is its own run: ?fail=STEP fails it', LIMIT, async () => {
  const ok = await fetch(`${base}/trips`, { method: 'POST', body: TRIP });
  assert.equal(ok.status, 200);
  const failed = await fetch(`${base}/trips?fail=reserve-hotel`, { method: 'POST', body: TRIP });
  assert.equal(failed.status, 500);
});

test('run as a script it listens on 127.0.0.1 (--port, else $PORT) and stops on SIGTERM', LIMIT, async () => {
  const child = spawn(process.execPath, [SCRIPT, '--port', '0'], {
    env: { ...process.env, PORT: '1' }, stdio: ['ignore', 'pipe', 'inherit'],
  });
  try {
    let output = '';
    child.stdout.setEncoding('utf8');
    const address = await new Promise((resolve, reject) => {
      child.stdout.on('data', (chunk) => {
        output += chunk;
        const found = /listening on (http:\/\/127\.0\.0\.1:\d+)/.exec(output);
        if (found) resolve(found[1]);
      });
      child.once('exit', () => reject(new Error(`exited early: ${output}`)));
    });
    const response = await fetch(`${address}/trips`, { method: 'POST', body: TRIP });
    assert.equal(response.status, 200);
    const stats = await (await fetch(`${address}/stats`)).json();
    assert.deepEqual(stats,
      { 'reserve-flight': 1, 'reserve-hotel': 1, 'charge-card': 1, 'send-confirmation': 1, 'refund-flight': 0 });
  } finally {
    child.kill('SIGTERM');
  }
  const [code] = await once(child, 'exit');
  assert.equal(code, 0);
});
