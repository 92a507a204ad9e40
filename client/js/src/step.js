/**
 * The step API: `step.run`, `step.sleep`, `step.sleepUntil`, `step.waitForEvent`, `step.sendEvent`,
 * `step.signal`, `step.invoke`.
 *
 * Under the gateway each call gets an id (its name, then name#2, name#3, ... per name) and a
 * position (seq, 0-based call order) synchronously at the call, is looked up in the run's record
 * and either answered from it or executed and checkpointed. Outside the gateway steps simply run.
 * Once the gateway has fenced the attempt, every step throws the superseded signal: no function
 * runs and no callback goes out (a function already running finishes, its outcome is not sent).
 * A step with its own policy (`{retries, backoff, timeout}`) that the gateway recorded as failed
 * for good throws StepFailedError instead of running, on that invocation and every replay.
 */

import { formatDuration, formatInstant, sleepUntilLocal, toEpochMilliseconds, toMilliseconds }
  from './duration.js';
import {
  CallbackError, StepFailedError, StepOutputError, StepTimeoutError, StepUsageError, isRetriable,
  isSuperseded,
} from './errors.js';
import { MAX_STEP_ID_LENGTH, frames } from './invocation.js';

/** @typedef {import('./invocation.js').Invocation} Invocation */

// Error messages are stored in the run's timeline; a huge one helps nobody there.
const MAX_ERROR_MESSAGE_LENGTH = 4_000;
// Leaves room for the "#NNNN" repeat suffix inside the gateway's 256-character id limit.
const MAX_NAME_LENGTH = MAX_STEP_ID_LENGTH - 8;

// The gateway takes at most 1000 attempts of a step, and parks a run for at most a day on one.
const MAX_RETRIES = 999;
const MAX_BACKOFF_MS = 86_400_000;
const MAX_MULTIPLIER = 100;

/**
 * Runs `fn(...args)` as the step `name` and returns its result as JSON (the same value a replay
 * returns: `undefined` becomes null, a Date becomes its ISO string). An options object may come
 * before `fn`: `step.run(name, { retries, backoff, timeout }, fn, ...args)`.
 * @param {string} name
 * @param {any} fnOrOptions
 * @param {...unknown} rest
 */
async function run(name, fnOrOptions, ...rest) {
  let options = null;
  let fn = fnOrOptions;
  let args = rest;
  if (typeof fnOrOptions === 'object' && fnOrOptions !== null) {
    options = stepOptions(name, fnOrOptions);
    [fn, ...args] = rest;
  }
  if (typeof fn !== 'function') {
    throw new StepUsageError(`step.run("${String(name)}") needs a function, got ${typeof fn}`);
  }
  const invocation = enter(name);
  const { id, seq } = allocate(invocation, name);
  const operation = invocation?.gateway
    ? runDurable(invocation, id, seq, fn, args, options)
    : runLocal(invocation, id, fn, args, options);
  return invocation === null ? operation : invocation.track(operation);
}

/**
 * A step's own policy, checked: the `policy` member its failed attempts send (null: the route's
 * retry policy decides), and the time-out of one attempt in milliseconds (null: none).
 * @param {unknown} name
 * @param {Record<string, unknown>} options
 * @returns {{ policy: Record<string, unknown> | null, timeout: number | null }}
 */
function stepOptions(name, options) {
  const what = `step.run("${String(name)}")`;
  const unknown = Object.keys(options).filter((key) => !['retries', 'backoff', 'timeout'].includes(key));
  if (unknown.length > 0) {
    throw new StepUsageError(`${what}: unknown option "${unknown[0]}" (use retries, backoff, timeout)`);
  }
  const { retries, backoff, timeout } = options;
  if (retries !== undefined && (!Number.isInteger(retries) || /** @type {number} */ (retries) < 0 ||
      /** @type {number} */ (retries) > MAX_RETRIES)) {
    throw new StepUsageError(`${what}: retries must be a whole number from 0 to ${MAX_RETRIES}`);
  }
  if (backoff !== undefined && retries === undefined) {
    throw new StepUsageError(`${what}: backoff needs retries (how many times the step is retried)`);
  }
  let policy = null;
  if (retries !== undefined) {
    policy = { attempts: /** @type {number} */ (retries) + 1, ...wireBackoff(what, backoff) };
  }
  let ms = null;
  if (timeout !== undefined) {
    ms = toMilliseconds(timeout, `${what} timeout`);
    if (ms === 0) throw new StepUsageError(`${what}: a step timeout must be longer than 0`);
  }
  return { policy, timeout: ms };
}

/**
 * @param {string} what
 * @param {unknown} backoff a duration (the first wait) or { initial?, max?, multiplier? }
 */
function wireBackoff(what, backoff) {
  let initial = 1_000;
  let max = 60_000;
  let multiplier = 2;
  if (typeof backoff === 'number' || typeof backoff === 'string') {
    initial = toMilliseconds(backoff, `${what} backoff`);
    max = Math.max(initial, max);
  } else if (typeof backoff === 'object' && backoff !== null) {
    const given = /** @type {Record<string, unknown>} */ (backoff);
    const unknown = Object.keys(given).filter((key) => !['initial', 'max', 'multiplier'].includes(key));
    if (unknown.length > 0) {
      throw new StepUsageError(`${what}: unknown backoff option "${unknown[0]}" (use initial, max, multiplier)`);
    }
    if (given.initial !== undefined) initial = toMilliseconds(given.initial, `${what} backoff.initial`);
    max = given.max !== undefined ? toMilliseconds(given.max, `${what} backoff.max`) : Math.max(initial, max);
    if (given.multiplier !== undefined) {
      if (typeof given.multiplier !== 'number' || !(given.multiplier >= 1 && given.multiplier <= MAX_MULTIPLIER)) {
        throw new StepUsageError(`${what}: backoff.multiplier must be a number from 1 to ${MAX_MULTIPLIER}`);
      }
      multiplier = given.multiplier;
    }
  } else if (backoff !== undefined) {
    throw new StepUsageError(`${what}: backoff is a duration or { initial, max, multiplier }`);
  }
  if (max === 0 || max > MAX_BACKOFF_MS) {
    throw new StepUsageError(`${what}: backoff.max must be longer than 0 and at most 1 day`);
  }
  if (initial > max) throw new StepUsageError(`${what}: backoff.initial is longer than backoff.max`);
  return { initial: formatDuration(initial), max: formatDuration(max), multiplier };
}

/**
 * Pauses for `duration` (milliseconds, or a string like "30s", "5m", "1h").
 * @param {string} name
 * @param {number | string} duration
 * @returns {Promise<void>}
 */
async function sleep(name, duration) {
  const ms = toMilliseconds(duration, `step.sleep("${String(name)}") duration`);
  // The deadline is fixed at the call: a slow record lookup must not lengthen the sleep.
  return pause(name, Date.now() + ms);
}

/**
 * Pauses until `when` (a Date, a date string, or epoch milliseconds).
 * @param {string} name
 * @param {Date | string | number} when
 * @returns {Promise<void>}
 */
async function sleepUntil(name, when) {
  return pause(name, toEpochMilliseconds(when, `step.sleepUntil("${String(name)}") time`));
}

/**
 * Waits for an event named `event` whose fields match `match`; returns the event object, or null
 * when `timeout` (milliseconds or a duration string; the gateway's default is 24h) passes first.
 * @param {string} name
 * @param {{ event: string, match?: Record<string, unknown>, timeout?: number | string }} options
 */
async function waitForEvent(name, options) {
  const what = `step.waitForEvent("${String(name)}")`;
  if (typeof options !== 'object' || options === null) {
    throw new StepUsageError(`${what} needs options { event, match?, timeout? }`);
  }
  const { event, match = {}, timeout } = options;
  if (typeof event !== 'string' || event === '') {
    throw new StepUsageError(`${what}: event must be a non-empty string`);
  }
  if (typeof match !== 'object' || match === null || Array.isArray(match)) {
    throw new StepUsageError(`${what}: match must be an object of dotted paths to values`);
  }
  /** @type {{ event: string, match: Record<string, unknown>, timeout?: string }} */
  const wait = { event, match };
  if (timeout !== undefined) {
    const ms = toMilliseconds(timeout, `${what} timeout`);
    if (ms === 0) throw new StepUsageError(`${what}: a wait needs a positive timeout`);
    wait.timeout = formatDuration(ms);
  }
  const invocation = enter(name);
  if (!invocation?.gateway) {
    throw new StepUsageError(`${what} needs the Stepgate gateway: this request did not come ` +
      'through a durable route (no Stepgate-Callback and Stepgate-Token headers), so no event ' +
      'can be delivered to it', { stepId: name });
  }
  const { id, seq } = allocate(invocation, name);
  return invocation.track(waitDurable(invocation, id, seq, wait));
}

/**
 * Sends the event `name` with `data` (JSON) from this run, once, recorded as the step `name`;
 * resolves with the event's id. A replay returns the recorded id and sends nothing. Only under
 * the gateway: elsewhere it rejects with StepUsageError.
 * @param {string} name
 * @param {unknown} [data]
 * @returns {Promise<string>}
 */
async function sendEvent(name, data = null) {
  const what = `step.sendEvent("${String(name)}")`;
  const invocation = enter(name);
  if (!invocation?.gateway) {
    throw new StepUsageError(`${what} needs the Stepgate gateway: this request did not come ` +
      'through a durable route (no Stepgate-Callback and Stepgate-Token headers)', { stepId: name });
  }
  let payload;
  try {
    payload = toJson(name, data);
  } catch (cause) {
    throw new StepUsageError(`${what}: data must be JSON`, { stepId: name, cause });
  }
  const { id, seq } = allocate(invocation, name);
  return invocation.track(sendDurable(invocation, id, seq, { name, data: payload, step: id, seq }));
}

/**
 * A single-use URL that completes this step when JSON is POSTed to it. Resolves at once with a
 * handle: send `handle.url` wherever it must go (a mail, a webhook registration; best from a
 * step), then `await handle.wait()` for the POSTed body, or null once `timeout` (milliseconds or
 * a duration string; the gateway's default is 24h) has passed. Until then the run is parked.
 * Only under the gateway.
 * @param {string} name
 * @param {{ timeout?: number | string }} [options]
 * @returns {Promise<SignalHandle>}
 */
async function signal(name, options = {}) {
  const what = `step.signal("${String(name)}")`;
  if (typeof options !== 'object' || options === null) {
    throw new StepUsageError(`${what} takes options { timeout? }`);
  }
  /** @type {{ timeout?: string }} */
  const body = {};
  if (options.timeout !== undefined) {
    const ms = toMilliseconds(options.timeout, `${what} timeout`);
    if (ms === 0) throw new StepUsageError(`${what}: a signal needs a positive timeout`);
    body.timeout = formatDuration(ms);
  }
  const invocation = enter(name);
  if (!invocation?.gateway) {
    throw new StepUsageError(`${what} needs the Stepgate gateway: this request did not come ` +
      'through a durable route (no Stepgate-Callback and Stepgate-Token headers), so there is ' +
      'no URL to POST the signal to', { stepId: name });
  }
  const { id, seq } = allocate(invocation, name);
  return invocation.track(signalDurable(invocation, id, seq, body));
}

/**
 * Runs the durable route `route` as a child of this run: the gateway starts it once (a POST of
 * `body`, as JSON, to the route's path) and parks this run until the child ends. Resolves with the
 * child's final response body, JSON-decoded when it is JSON, else its text; a child that ends
 * failed rejects with StepFailedError (`status` is its final HTTP status), now and on every
 * replay. Cancelling this run cancels the child. Only under the gateway.
 * @param {string} name
 * @param {{ route: string, body?: unknown }} options
 * @returns {Promise<unknown>}
 */
async function invoke(name, options) {
  const what = `step.invoke("${String(name)}")`;
  if (typeof options !== 'object' || options === null || typeof options.route !== 'string' ||
    options.route === '') {
    throw new StepUsageError(`${what} needs options { route, body? }, route being the name of a ` +
      'durable route', { stepId: typeof name === 'string' ? name : null });
  }
  let body;
  try {
    body = toJson(String(name), options.body ?? null);
  } catch (cause) {
    throw new StepUsageError(`${what}: body must be JSON`, { stepId: String(name), cause });
  }
  const invocation = enter(name);
  if (!invocation?.gateway) {
    throw new StepUsageError(`${what} needs the Stepgate gateway: this request did not come ` +
      'through a durable route (no Stepgate-Callback and Stepgate-Token headers), so no child run ' +
      'can be started', { stepId: name });
  }
  const { id, seq } = allocate(invocation, name);
  return invocation.track(invokeDurable(invocation, id, seq, { route: options.route, body }));
}

export const step = Object.freeze({ run, sleep, sleepUntil, waitForEvent, sendEvent, signal, invoke });

/**
 * What `step.signal` resolves with. `wait()` makes no callback: it answers from the record, or
 * suspends the invocation until the gateway invokes the run again, signalled or timed out.
 */
export class SignalHandle {
  #invocation;
  #completed;
  #output;

  /**
   * @param {Invocation} invocation
   * @param {string} stepId
   * @param {string} url
   * @param {boolean} completed
   * @param {unknown} output
   */
  constructor(invocation, stepId, url, completed, output) {
    this.#invocation = invocation;
    this.#completed = completed;
    this.#output = output;
    /** Where to POST the signal; single use, and a secret. */
    this.url = url;
    this.stepId = stepId;
    Object.freeze(this);
  }

  /** Whether the signal was POSTed to (or timed out) before this invocation. */
  get completed() {
    return this.#completed;
  }

  /** The JSON body POSTed to `url`, or null after the time-out; suspends until then. */
  async wait() {
    this.#invocation.ensureLive();
    if (this.#completed) return this.#output ?? null;
    throw this.#invocation.suspend(this.stepId, 'waiting');
  }
}

/**
 * Checks the call and returns the current invocation (null outside any adapter).
 * @param {unknown} name
 * @returns {Invocation | null}
 */
function enter(name) {
  if (typeof name !== 'string' || name === '') {
    throw new StepUsageError('a step name must be a non-empty string');
  }
  if ([...name].length > MAX_NAME_LENGTH) {
    throw new StepUsageError(`step name "${name.slice(0, 40)}..." is longer than ${MAX_NAME_LENGTH} characters`);
  }
  if (name.includes('#')) {
    throw new StepUsageError(`step name "${name}" must not contain "#": repeated calls are ` +
      'numbered name#2, name#3, ... and could collide with it', { stepId: name });
  }
  const frame = frames.getStore();
  if (frame?.stepId != null) {
    // A nested step would take a position only when its parent runs, so a replay that answers
    // the parent from the record would shift every later position.
    throw new StepUsageError(`step "${name}" was called inside step "${frame.stepId}"; steps ` +
      'cannot be nested, call them one after the other in the handler', { stepId: name });
  }
  const invocation = frame?.invocation ?? null;
  invocation?.ensureCanStart(name);
  return invocation;
}

/**
 * @param {Invocation | null} invocation
 * @param {string} name
 */
function allocate(invocation, name) {
  return invocation === null ? { id: name, seq: -1 } : invocation.allocate(name);
}

/**
 * @param {string} name
 * @param {number} until epoch milliseconds
 * @returns {Promise<void>}
 */
function pause(name, until) {
  const invocation = enter(name);
  const { id, seq } = allocate(invocation, name);
  const operation = invocation?.gateway
    ? sleepDurable(invocation, id, seq, until)
    : sleepUntilLocal(until);
  return invocation === null ? operation : invocation.track(operation);
}

/**
 * @param {Invocation} invocation
 * @param {string} id
 * @param {number} seq
 * @param {(...args: any[]) => unknown} fn
 * @param {unknown[]} args
 * @param {{ policy: Record<string, unknown> | null, timeout: number | null } | null} options
 */
async function runDurable(invocation, id, seq, fn, args, options) {
  const record = await invocation.recorded(id, seq, 'run');
  if (record?.status === 'completed') return record.output ?? null;
  // Failed for good (its policy is spent): the handler is told instead of running it again.
  if (record?.status === 'failed' && record.final === true) {
    throw finalFailure(invocation, id, record.error, record.attempts);
  }
  // A parallel step may have been refused while this one waited for the record.
  invocation.ensureLive();
  // Not recorded, or recorded as failed: (re-)execute it.
  let output;
  try {
    output = toJson(id, await callStep(invocation, id, fn, args, options?.timeout ?? null));
  } catch (err) {
    const answer = await recordFailure(invocation, id, seq, err, options?.policy ?? null);
    if (answer?.status === 'failed' && answer.final === true) {
      throw finalFailure(invocation, id, { message: messageOf(err), type: typeOf(err) }, answer.attempts, err);
    }
    throw err;
  }
  const answer = await invocation.putStep(id, { output, seq });
  if (answer.status === 'failed' && answer.final === true) {
    throw finalFailure(invocation, id, null, answer.attempts);
  }
  if (answer.status !== 'completed' || !('output' in answer)) throw unexpected(invocation, id, answer);
  // The gateway keeps the first output stored for a step; use it, as a replay would.
  return answer.output;
}

/**
 * @param {Invocation} invocation
 * @param {string} id
 * @param {unknown} error the recorded error
 * @param {unknown} attempts
 * @param {unknown} [cause]
 */
function finalFailure(invocation, id, error, attempts, cause) {
  const recorded = typeof error === 'object' && error !== null && typeof (/** @type {any} */ (error).message) === 'string'
    ? /** @type {{ message: string, type?: string }} */ (error) : null;
  const count = Number.isInteger(attempts) ? /** @type {number} */ (attempts) : null;
  const message = `step "${id}" failed for good` +
    (count !== null ? ` after ${count} attempt${count === 1 ? '' : 's'}` : '') +
    (recorded !== null ? `: ${recorded.message}` : '');
  return new StepFailedError(message, {
    stepId: id, runId: invocation.runId, error: recorded, attempts: count,
    cause: cause === undefined ? undefined : cause,
  });
}

/**
 * @param {Invocation} invocation
 * @param {string} id
 * @param {number} seq
 * @param {{ name: string, data: unknown, step: string, seq: number }} body
 * @returns {Promise<string>}
 */
async function sendDurable(invocation, id, seq, body) {
  const record = await invocation.recorded(id, seq, 'event');
  const sent = record?.status === 'completed' ? record.output : await invocation.postEvent(id, body);
  if (typeof sent?.id !== 'string') throw unexpected(invocation, id, sent);
  return sent.id;
}

/**
 * @param {Invocation | null} invocation
 * @param {string} id
 * @param {(...args: any[]) => unknown} fn
 * @param {unknown[]} args
 * @param {{ policy: Record<string, unknown> | null, timeout: number | null } | null} options
 */
async function runLocal(invocation, id, fn, args, options) {
  return toJson(id, await callStep(invocation, id, fn, args, options?.timeout ?? null));
}

/**
 * @param {Invocation | null} invocation
 * @param {string} id
 * @param {(...args: any[]) => unknown} fn
 * @param {unknown[]} args
 * @param {number | null} [timeout] milliseconds
 */
function callStep(invocation, id, fn, args, timeout = null) {
  const result = frames.run({ invocation, stepId: id }, () => fn(...args));
  if (timeout === null) return result;
  // The function cannot be stopped: when the time-out wins, its result is dropped.
  /** @type {ReturnType<typeof setTimeout> | undefined} */
  let timer;
  const expired = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new StepTimeoutError(
      `step "${id}" took longer than its timeout of ${formatDuration(timeout)}`, { stepId: id, timeout })), timeout);
  });
  return Promise.race([Promise.resolve(result), expired]).finally(() => clearTimeout(timer));
}

/**
 * @param {Invocation} invocation
 * @param {string} id
 * @param {number} seq
 * @param {number} until
 */
async function sleepDurable(invocation, id, seq, until) {
  const record = await invocation.recorded(id, seq, 'sleep');
  if (record?.status === 'completed') return;
  if (record?.status === 'sleeping' || record?.status === 'waiting') {
    throw invocation.suspend(id, 'sleeping');
  }
  const answer = await invocation.putStep(id, { sleep: { until: formatInstant(until) }, seq });
  if (answer.status === 'completed') return;
  if (answer.status === 'sleeping') throw invocation.suspend(id, 'sleeping');
  throw unexpected(invocation, id, answer);
}

/**
 * @param {Invocation} invocation
 * @param {string} id
 * @param {number} seq
 * @param {{ event: string, match: Record<string, unknown>, timeout?: string }} wait
 */
async function waitDurable(invocation, id, seq, wait) {
  const record = await invocation.recorded(id, seq, 'wait');
  if (record?.status === 'completed') return eventOrNull(record.output);
  if (record?.status === 'waiting' || record?.status === 'sleeping') {
    throw invocation.suspend(id, 'waiting');
  }
  const answer = await invocation.putStep(id, { wait, seq });
  if (answer.status === 'completed') return eventOrNull(answer.output);
  if (answer.status === 'waiting') throw invocation.suspend(id, 'waiting');
  throw unexpected(invocation, id, answer);
}

/**
 * @param {Invocation} invocation
 * @param {string} id
 * @param {number} seq
 * @param {{ timeout?: string }} signal
 */
async function signalDurable(invocation, id, seq, signal) {
  const record = await invocation.recorded(id, seq, 'signal');
  /** @type {Record<string, any> | null} */
  let state = record !== null && (record.status === 'completed' || record.status === 'waiting') &&
    typeof record.url === 'string' ? record : null;
  if (state === null) {
    invocation.ensureLive();
    const answer = await invocation.putStep(id, { signal, seq });
    if ((answer.status !== 'completed' && answer.status !== 'waiting') ||
      typeof answer.url !== 'string') {
      throw unexpected(invocation, id, answer);
    }
    state = answer;
  }
  return new SignalHandle(invocation, id, state.url, state.status === 'completed', state.output);
}

/**
 * @param {Invocation} invocation
 * @param {string} id
 * @param {number} seq
 * @param {{ route: string, body: unknown }} invoke
 */
async function invokeDurable(invocation, id, seq, invoke) {
  const record = await invocation.recorded(id, seq, 'invoke');
  // A failed record that is not final (an operator retried the run) starts a new child.
  /** @type {Record<string, any> | null} */
  let state = record !== null && (record.status === 'completed' || record.status === 'waiting' ||
    (record.status === 'failed' && record.final === true)) ? record : null;
  if (state === null) {
    invocation.ensureLive();
    state = await invocation.putStep(id, { invoke, seq });
  }
  if (state.status === 'completed') return state.output ?? null;
  if (state.status === 'waiting') throw invocation.suspend(id, 'waiting');
  if (state.status === 'failed') throw childFailure(invocation, id, state.error);
  throw unexpected(invocation, id, state);
}

/**
 * The StepFailedError of an invoke whose child run ended failed.
 * @param {Invocation} invocation
 * @param {string} id
 * @param {unknown} error the recorded error: message, status (the child's), run_id
 */
function childFailure(invocation, id, error) {
  const recorded = typeof error === 'object' && error !== null ? /** @type {Record<string, any>} */ (error) : null;
  const status = Number.isInteger(recorded?.status) ? /** @type {number} */ (recorded?.status) : null;
  const message = `step "${id}" failed for good: ` +
    (typeof recorded?.message === 'string' ? recorded.message : 'its child run failed');
  return new StepFailedError(message, {
    stepId: id, runId: invocation.runId,
    error: recorded && typeof recorded.message === 'string'
      ? /** @type {{ message: string, type?: string }} */ (recorded) : null,
    status,
  });
}

/**
 * Records a failed attempt of a step. If the record itself fails, the step's own error still
 * propagates: the invocation fails either way, and that error is the one the handler expects.
 * A fenced attempt is the exception: the superseded signal replaces the step's error.
 * @param {Invocation} invocation
 * @param {string} id
 * @param {number} seq
 * @param {unknown} err
 * @param {Record<string, unknown> | null} [policy] the step's own retry policy
 * @returns {Promise<Record<string, any> | null>} the gateway's answer, null if none came
 */
async function recordFailure(invocation, id, seq, err, policy = null) {
  const error = { message: messageOf(err), type: typeOf(err), retriable: isRetriable(err) };
  try {
    return await invocation.putStep(id, policy === null ? { error, seq } : { error, seq, policy });
  } catch (failed) {
    if (isSuperseded(failed)) throw failed;
    // See above: otherwise deliberately dropped in favour of the step's error.
    return null;
  }
}

/**
 * The value as it comes back from JSON, so a first run and a replay return the same thing.
 * @param {string} id
 * @param {unknown} value
 */
function toJson(id, value) {
  let text;
  try {
    text = JSON.stringify(value === undefined ? null : value);
  } catch (cause) {
    throw new StepOutputError(`step "${id}" returned a value that is not JSON: ` +
      `${cause instanceof Error ? cause.message : String(cause)}`, { stepId: id, cause });
  }
  if (text === undefined) {
    throw new StepOutputError(`step "${id}" returned a ${typeof value}, which is not JSON`, { stepId: id });
  }
  return JSON.parse(text);
}

/**
 * A wait's output: the event object, or null when the wait timed out.
 * @param {unknown} output
 */
function eventOrNull(output) {
  return typeof output === 'object' && output !== null && !Array.isArray(output) ? output : null;
}

/** @param {unknown} err */
function messageOf(err) {
  const message = err instanceof Error ? err.message
    : typeof err === 'object' && err !== null && typeof (/** @type {any} */ (err).message) === 'string'
      ? /** @type {any} */ (err).message : String(err);
  return message.length > MAX_ERROR_MESSAGE_LENGTH
    ? `${message.slice(0, MAX_ERROR_MESSAGE_LENGTH)}...` : message;
}

/** @param {unknown} err */
function typeOf(err) {
  if (!(err instanceof Error)) return err === null ? 'null' : typeof err;
  // `class PaymentDeclined extends Error {}` keeps name "Error"; its class name says more.
  return err.name !== 'Error' ? err.name : err.constructor?.name || 'Error';
}

/**
 * @param {Invocation} invocation
 * @param {string} id
 * @param {unknown} answer
 */
function unexpected(invocation, id, answer) {
  return new CallbackError(`stepgate callback PUT for step "${id}" answered an unexpected body: ` +
    JSON.stringify(answer), { runId: invocation.runId, stepId: id, method: 'PUT', status: null, problem: null });
}
