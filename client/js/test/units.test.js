// Pure pieces: durations and instants, the error tree, the suspend signal.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  CallbackError, GatewayUnavailableError, NonRetriableError, ReplayMismatchError, StepgateError,
  StepOutputError, StepUsageError, isSuspend, rethrowIfSuspend,
} from '../src/index.js';
import { formatDuration, formatInstant, toEpochMilliseconds, toMilliseconds } from '../src/duration.js';
import { Suspend } from '../src/errors.js';

// A hung test fails instead of stalling the run.
const LIMIT = { timeout: 20_000 };

test('durations: milliseconds or the gateway grammar, rounded up to whole ms', LIMIT, () => {
  assert.equal(toMilliseconds(1500, 'x'), 1500);
  assert.equal(toMilliseconds(0.2, 'x'), 1);
  assert.equal(toMilliseconds('250ms', 'x'), 250);
  assert.equal(toMilliseconds('30s', 'x'), 30_000);
  assert.equal(toMilliseconds('1.5h', 'x'), 5_400_000);
  assert.equal(toMilliseconds('2d', 'x'), 172_800_000);
  assert.equal(toMilliseconds(' 5m ', 'x'), 300_000);
  for (const bad of ['', '5', '5 m', '-1s', '1w', 'PT5M', Number.NaN, Infinity, -1, null, {}]) {
    assert.throws(() => toMilliseconds(bad, 'timeout'), StepUsageError, String(bad));
  }
});

test('durations go on the wire as whole seconds, else whole milliseconds', LIMIT, () => {
  const cases = [[1, '1ms'], [1500, '1500ms'], [2000, '2s'], [90_000, '90s'], [86_400_000, '86400s']];
  for (const [ms, wire] of cases) assert.equal(formatDuration(Number(ms)), wire);
});

test('instants: Dates, strings and epoch ms; written RFC 3339 with a numeric offset', LIMIT, () => {
  const ms = Date.UTC(2030, 0, 2, 3, 4, 5, 6);
  assert.equal(toEpochMilliseconds(new Date(ms), 'x'), ms);
  assert.equal(toEpochMilliseconds('2030-01-02T05:04:05.006+02:00', 'x'), ms);
  assert.equal(toEpochMilliseconds(ms, 'x'), ms);
  assert.throws(() => toEpochMilliseconds(new Date('nope'), 'x'), StepUsageError);
  assert.throws(() => toEpochMilliseconds(undefined, 'x'), StepUsageError);
  assert.equal(formatInstant(ms), '2030-01-02T03:04:05.006+00:00');
});

test('the error tree has one root and structured fields', LIMIT, () => {
  const nonRetriable = new NonRetriableError('bad input', { status: 400 });
  assert.ok(nonRetriable instanceof StepgateError && nonRetriable instanceof Error);
  assert.equal(nonRetriable.status, 400);
  assert.equal(nonRetriable.name, 'NonRetriableError');
  assert.equal(new NonRetriableError('default').status, 500);
  assert.throws(() => new NonRetriableError('ok?', { status: 200 }), RangeError);
  const mismatch = new ReplayMismatchError({ runId: 'r', seq: 2, stepId: 'b', recordedId: 'a', recordedSeq: null });
  assert.ok(mismatch instanceof StepgateError);
  assert.equal(mismatch.name, 'ReplayMismatchError');
  assert.match(mismatch.message, /position 2: the handler called "b" but the run recorded "a"/);
  assert.ok(new StepUsageError('x') instanceof StepgateError);
  const output = new StepOutputError('x', { stepId: 's' });
  assert.ok(output instanceof StepgateError);
  assert.equal(output.stepId, 's');
  const unavailable = new GatewayUnavailableError('x', { runId: 'r', stepId: null, method: 'PUT', status: null, problem: null });
  assert.ok(unavailable instanceof CallbackError);
  assert.equal(unavailable.name, 'GatewayUnavailableError');
  const callback = new CallbackError('x', { runId: 'r', stepId: null, method: 'GET', status: 404, problem: null });
  assert.ok(callback instanceof StepgateError);
  assert.equal(callback.status, 404);
});

test('the suspend signal is no Error, is recognised, and rethrowIfSuspend rethrows only it', LIMIT, () => {
  const signal = new Suspend('run', 'nap', 'sleeping');
  assert.equal(signal instanceof Error, false);
  assert.equal(isSuspend(signal), true);
  for (const other of [new Error('x'), null, undefined, 'suspend', { name: 'StepgateSuspend' }]) {
    assert.equal(isSuspend(other), false);
    assert.doesNotThrow(() => rethrowIfSuspend(other));
  }
  assert.throws(() => rethrowIfSuspend(signal), (err) => err === signal);
});
