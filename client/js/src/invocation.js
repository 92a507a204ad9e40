/**
 * The state of one invocation of a handler: which run it serves (if any), the step ids and
 * positions handed out so far, the run's recorded steps, and whether it has suspended, hit a
 * replay mismatch or been fenced by the gateway. An AsyncLocalStorage carries it from the adapter
 * to every step call. Every callback goes through `getSteps`/`putStep` here, the one place that
 * enforces the fence: once the gateway has refused one callback as superseded, no other is sent.
 */

import { AsyncLocalStorage } from 'node:async_hooks';

import { ReplayMismatchError, StepUsageError, Suspend, isSuperseded } from './errors.js';
import { Transport } from './transport.js';

/**
 * What the AsyncLocalStorage holds: the invocation (null when no adapter wraps the handler) and
 * the step whose function is running (null in the handler itself), to reject nested steps.
 * @typedef {{ invocation: Invocation | null, stepId: string | null }} Frame
 */

/** @type {AsyncLocalStorage<Frame>} */
export const frames = new AsyncLocalStorage();

// Ids are at most 256 characters decoded (the callback API's limit).
export const MAX_STEP_ID_LENGTH = 256;

export class Invocation {
  /**
   * Builds the invocation for a request from its headers; gateway mode needs both
   * Stepgate-Callback and Stepgate-Token, anything less runs steps in-process.
   * @param {(name: string) => string | null | undefined} header reads a request header
   */
  static fromHeaders(header) {
    const callback = header('stepgate-callback');
    const token = header('stepgate-token');
    if (!callback || !token) return new Invocation(null);
    const steps = header('stepgate-steps');
    const attempt = header('stepgate-attempt');
    return new Invocation({
      runId: header('stepgate-run-id') || null,
      attempt: attempt && /^\d+$/.test(attempt.trim()) ? Number(attempt) : null,
      callback,
      token,
      // Unknown or garbled counts fetch the record: asking once too often is safe, never asking is not.
      stepCount: steps && /^\d+$/.test(steps.trim()) ? Number(steps) : null,
    });
  }

  /**
   * @param {{ runId: string | null, attempt?: number | null, callback: string, token: string,
   *            stepCount: number | null } | null} gateway
   */
  constructor(gateway) {
    this.gateway = gateway;
    this.runId = gateway?.runId ?? null;
    this.attempt = gateway?.attempt ?? null;
    this.transport = gateway === null ? null
      : new Transport({ ...gateway, attempt: this.attempt });
    /** @type {Map<string, number>} calls so far per step name, for name#2, name#3, ... */
    this.counts = new Map();
    this.nextSeq = 0;
    /** @type {Suspend | null} the first suspend signal; sticky for the rest of the invocation */
    this.suspended = null;
    /** @type {ReplayMismatchError | null} sticky like a suspension, and it takes precedence */
    this.fatal = null;
    /** @type {import('./errors.js').SupersededError | null} the gateway's fence; sticky, first */
    this.superseded = null;
    this.closed = false;
    /** @type {Set<Promise<void>>} step operations not yet settled */
    this.pending = new Set();
    /** @type {Array<() => void>} */
    this.interruptListeners = [];
    /** @type {Promise<{ bySeq: Map<number, any>, seqById: Map<string, number> }> | null} */
    this.record = null;
  }

  /**
   * Throws when no new step may start: after the answer, or once the invocation suspended or
   * hit a mismatch (the handler must stop; running more steps would record work out of order).
   * @param {string} name
   */
  ensureCanStart(name) {
    if (this.superseded !== null) throw this.superseded;
    if (this.closed) {
      throw new StepUsageError(`step "${name}" was called after the handler's answer was sent; ` +
        'every step must finish before the handler answers');
    }
    if (this.fatal !== null) throw this.fatal;
    if (this.suspended !== null) throw this.suspended;
  }

  /**
   * Hands out the next id and position. Called synchronously at the step call, so steps started
   * together (Promise.all) get ids in the order the calls were written.
   * @param {string} name
   * @returns {{ id: string, seq: number }}
   */
  allocate(name) {
    const count = (this.counts.get(name) ?? 0) + 1;
    const id = count === 1 ? name : `${name}#${count}`;
    if ([...id].length > MAX_STEP_ID_LENGTH) {
      throw new StepUsageError(`step id "${id.slice(0, 40)}..." is longer than ${MAX_STEP_ID_LENGTH} characters`,
        { stepId: id });
    }
    this.counts.set(name, count);
    const seq = this.nextSeq;
    this.nextSeq += 1;
    return { id, seq };
  }

  /**
   * The recorded step at position `seq`, or null when the run has none there; throws
   * ReplayMismatchError when the record disagrees with the call.
   * @param {string} id
   * @param {number} seq
   * @param {'run' | 'sleep' | 'wait' | 'event' | 'signal' | 'invoke'} kind
   * @returns {Promise<Record<string, any> | null>}
   */
  async recorded(id, seq, kind) {
    // Stepgate-Steps: 0 means the run has no record yet: do not spend a round trip on it.
    if (this.gateway === null || this.gateway.stepCount === 0) return null;
    this.record ??= this.#loadRecord();
    const { bySeq, seqById } = await this.record;
    const atSeq = bySeq.get(seq) ?? null;
    const recordedSeq = seqById.get(id) ?? null;
    const mismatch = (atSeq !== null && atSeq.id !== id) ||
      (atSeq === null && recordedSeq !== null) ||
      (atSeq !== null && typeof atSeq.kind === 'string' && atSeq.kind !== kind);
    if (mismatch) {
      throw this.abort(new ReplayMismatchError({
        runId: this.runId, seq, stepId: id, recordedId: atSeq?.id ?? null, recordedSeq,
        kind, recordedKind: typeof atSeq?.kind === 'string' ? atSeq.kind : undefined,
      }));
    }
    return atSeq;
  }

  /** Throws the fence's signal if the gateway has given up on this attempt. */
  ensureLive() {
    if (this.superseded !== null) throw this.superseded;
  }

  /**
   * `PUT {cb}/steps/{id}`, unless the attempt is fenced.
   * @param {string} stepId
   * @param {Record<string, unknown>} body
   * @returns {Promise<Record<string, any>>}
   */
  async putStep(stepId, body) {
    this.ensureLive();
    try {
      return await /** @type {Transport} */ (this.transport).putStep(stepId, body);
    } catch (err) {
      throw this.#fenced(err);
    }
  }

  /**
   * `POST {cb}/events`: send an event as the step `stepId`, unless the attempt is fenced.
   * @param {string} stepId
   * @param {Record<string, unknown>} body
   * @returns {Promise<Record<string, any>>}
   */
  async postEvent(stepId, body) {
    this.ensureLive();
    try {
      return await /** @type {Transport} */ (this.transport).postEvent(stepId, body);
    } catch (err) {
      throw this.#fenced(err);
    }
  }

  /**
   * The first superseded answer wins: parallel steps refused together all throw that one.
   * @param {unknown} err
   */
  #fenced(err) {
    if (!isSuperseded(err)) return err;
    if (this.superseded === null) {
      this.superseded = /** @type {import('./errors.js').SupersededError} */ (err);
      this.#interrupt();
    }
    return this.superseded;
  }

  async #loadRecord() {
    this.ensureLive();
    let steps;
    try {
      steps = await /** @type {Transport} */ (this.transport).getSteps();
    } catch (err) {
      throw this.#fenced(err);
    }
    const bySeq = new Map();
    const seqById = new Map();
    steps.forEach((record, index) => {
      // The list is ordered by seq; fall back to the position if a record lacks it.
      const seq = Number.isInteger(record?.seq) ? record.seq : index;
      bySeq.set(seq, record);
      if (typeof record?.id === 'string') seqById.set(record.id, seq);
    });
    return { bySeq, seqById };
  }

  /**
   * Keeps a step operation in `pending` until it settles, so the adapter can wait for every
   * step before answering. The caller still gets `operation` itself, with its rejection.
   * @template T
   * @param {Promise<T>} operation
   * @returns {Promise<T>}
   */
  track(operation) {
    // `settled` never rejects, so waiting on it cannot throw; the caller's own promise keeps its
    // rejection (and Node's unhandled-rejection report if nobody awaits it).
    const settled = operation.then(() => {}, () => {});
    this.pending.add(settled);
    settled.then(() => this.pending.delete(settled));
    return operation;
  }

  /** Waits until no step operation is running (settling ones may start others). */
  async settle() {
    while (this.pending.size > 0) await Promise.all([...this.pending]);
  }

  /**
   * Records that the invocation must park and returns the signal to throw.
   * @param {string} stepId
   * @param {'sleeping' | 'waiting'} status
   */
  suspend(stepId, status) {
    const signal = new Suspend(this.runId, stepId, status);
    if (this.suspended === null) {
      this.suspended = signal;
      this.#interrupt();
    }
    return signal;
  }

  /**
   * @param {ReplayMismatchError} err
   * @returns {ReplayMismatchError}
   */
  abort(err) {
    if (this.fatal === null) {
      this.fatal = err;
      this.#interrupt();
    }
    return err;
  }

  /**
   * Runs the handler in this invocation's context, waits for every step it started, and closes
   * the invocation to new steps.
   * @param {() => unknown} call
   * @returns {Promise<{ ok: true, value: unknown } | { ok: false, error: unknown }>}
   */
  async execute(call) {
    /** @type {{ ok: true, value: unknown } | { ok: false, error: unknown }} */
    let outcome;
    try {
      outcome = { ok: true, value: await frames.run({ invocation: this, stepId: null }, call) };
    } catch (error) {
      outcome = { ok: false, error };
    }
    await this.settle();
    this.closed = true;
    return outcome;
  }

  /** @param {() => void} listener called once when the invocation suspends, aborts or is fenced */
  onInterrupt(listener) {
    this.interruptListeners.push(listener);
  }

  #interrupt() {
    const listeners = this.interruptListeners;
    this.interruptListeners = [];
    for (const listener of listeners) listener();
  }
}
