/**
 * Errors raised by the Stepgate SDK, and the suspend signal.
 *
 *     Error
 *     └── StepgateError            root of everything the SDK raises
 *         ├── NonRetriableError    thrown by handlers: answer `status`, tell the gateway not to retry
 *         ├── ReplayMismatchError  the handler called steps in another order than the run recorded
 *         ├── StepOutputError      a step returned a value JSON cannot hold
 *         ├── StepUsageError       a step was misused (bad name or duration, nested step, no gateway)
 *         ├── StepFailedError      the step failed for good (policy spent, or a child run failed);
 *         │                        thrown on every replay so the handler can compensate
 *         ├── StepTimeoutError     a step ran past its `timeout` (one failed attempt of the step)
 *         └── CallbackError        the gateway refused a callback or gave an unusable answer
 *             └── GatewayUnavailableError   no answer at all: refused, reset or timed out
 *
 * The two control signals, suspend and superseded, are deliberately NOT Errors (see `Suspend`
 * and `SupersededError` below); `isStepgateControl(err)` recognises both.
 */

/** Root of every error the SDK raises, so `err instanceof StepgateError` catches them all. */
export class StepgateError extends Error {
  /**
   * @param {string} message
   * @param {{ cause?: unknown }} [options]
   */
  constructor(message, options) {
    super(message, options);
    this.name = new.target.name;
  }
}

/**
 * Thrown by a handler (or a step) when retrying cannot help: the adapter answers `status` as
 * problem+json with `Stepgate-No-Retry: true`, and a step that throws it is recorded with
 * `retriable: false`, so the gateway ends the run.
 */
export class NonRetriableError extends StepgateError {
  /**
   * @param {string} message
   * @param {{ status?: number, cause?: unknown }} [options]
   */
  constructor(message, { status = 500, cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    if (!Number.isInteger(status) || status < 400 || status > 599) {
      // An error answer with a 2xx/3xx status would end the run as "completed".
      throw new RangeError(`NonRetriableError status must be 400..599, got ${status}`);
    }
    /** @type {number} */
    this.status = status;
  }
}

/**
 * The step called at position `seq` is not the one the run recorded there (or the step is
 * recorded at another position). Retrying the same code cannot help, so the adapter answers 500
 * with `Stepgate-No-Retry: true`.
 */
export class ReplayMismatchError extends StepgateError {
  /**
   * @param {{ runId: string | null, seq: number, stepId: string, recordedId: string | null,
   *           recordedSeq: number | null, kind?: string, recordedKind?: string }} fields
   */
  constructor({ runId, seq, stepId, recordedId, recordedSeq, kind, recordedKind }) {
    let message;
    if (recordedId !== null && recordedId !== stepId) {
      message = `replay mismatch at step position ${seq}: the handler called "${stepId}" ` +
        `but the run recorded "${recordedId}" there`;
    } else if (recordedKind !== undefined && kind !== recordedKind) {
      message = `replay mismatch at step position ${seq}: "${stepId}" was called as a ` +
        `${kind} step but the run recorded a ${recordedKind} step`;
    } else {
      message = `replay mismatch: the handler called "${stepId}" at step position ${seq} ` +
        `but the run recorded it at position ${recordedSeq}`;
    }
    super(message);
    this.runId = runId;
    this.seq = seq;
    this.stepId = stepId;
    this.recordedId = recordedId;
    this.recordedSeq = recordedSeq;
  }
}

/** A step returned a value that is not JSON; every retry would fail the same way. */
export class StepOutputError extends StepgateError {
  /**
   * @param {string} message
   * @param {{ stepId: string, cause?: unknown }} fields
   */
  constructor(message, { stepId, cause }) {
    super(message, cause === undefined ? undefined : { cause });
    this.stepId = stepId;
  }
}

/** A step API was used wrongly; the code must change, so the gateway is told not to retry. */
export class StepUsageError extends StepgateError {
  /**
   * @param {string} message
   * @param {{ stepId?: string | null, cause?: unknown }} [options]
   */
  constructor(message, { stepId = null, cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.stepId = stepId;
  }
}

/**
 * The step `stepId` has failed for good and is not run again, on this or any replay: the gateway
 * recorded it `failed` with `final: true` because its retry policy's attempts are spent, or the
 * child run it started ended failed (`status` is then the child's final HTTP status). `error` is
 * the last recorded error, `{message, type?}`. Catch it to compensate and answer; left uncaught
 * the run fails (the adapter answers 500 with `Stepgate-No-Retry`, as a retry cannot help).
 */
export class StepFailedError extends StepgateError {
  /**
   * @param {string} message
   * @param {{ stepId: string, runId?: string | null, error?: { message: string, type?: string } | null,
   *           attempts?: number | null, status?: number | null, cause?: unknown }} fields
   */
  constructor(message, { stepId, runId = null, error = null, attempts = null, status = null, cause }) {
    super(message, cause === undefined ? undefined : { cause });
    this.stepId = stepId;
    this.runId = runId;
    /** The last recorded error of the step, `{message, type?}`, when there is one. */
    this.error = error;
    /** How many attempts the step used, when known. */
    this.attempts = attempts;
    /** A failed child run's final HTTP status, else null. */
    this.status = status;
  }
}

/**
 * The step `stepId` ran longer than its `timeout` (milliseconds) and was cut off: a failed attempt
 * of the step, recorded and rethrown like any step error (its function may still be running; its
 * result is ignored).
 */
export class StepTimeoutError extends StepgateError {
  /**
   * @param {string} message
   * @param {{ stepId: string, timeout: number }} fields
   */
  constructor(message, { stepId, timeout }) {
    super(message);
    this.stepId = stepId;
    this.timeout = timeout;
  }
}

/** A call to the gateway's callback API failed: an error status or an unusable answer. */
export class CallbackError extends StepgateError {
  /**
   * @param {string} message
   * @param {{ runId: string | null, stepId: string | null, method: string,
   *           status: number | null, problem: unknown, cause?: unknown }} fields
   */
  constructor(message, { runId, stepId, method, status, problem, cause }) {
    super(message, cause === undefined ? undefined : { cause });
    this.runId = runId;
    this.stepId = stepId;
    this.method = method;
    /** HTTP status of the answer, or null when none arrived. */
    this.status = status;
    /** The parsed problem+json body, when the gateway sent one. */
    this.problem = problem;
  }
}

/** The gateway could not be reached, dropped the connection or did not answer in time. */
export class GatewayUnavailableError extends CallbackError {}

// A registry symbol, so two copies of this package in one process recognise each other's signal.
const SUSPEND = Symbol.for('stepgate.suspend');

/**
 * Thrown by `step.sleep`/`step.waitForEvent` when the run must park: the adapter answers 202 with
 * `Stepgate-Suspend: true`. JavaScript has no BaseException, so this class does not extend Error:
 * `err instanceof Error` filters and most loggers skip it. A bare `catch` still catches it, so the
 * SDK also makes suspension sticky: once an invocation has suspended, every later step call throws
 * the signal again and the adapter answers 202 whatever the handler returns.
 */
export class Suspend {
  /**
   * @param {string | null} runId
   * @param {string} stepId
   * @param {'sleeping' | 'waiting'} status
   */
  constructor(runId, stepId, status) {
    this.name = 'StepgateSuspend';
    this.runId = runId;
    this.stepId = stepId;
    this.status = status;
    this.message = `run suspended at step "${stepId}" (${status}); rethrow this signal ` +
      '(see isSuspend) so the gateway can park the run';
    Object.defineProperty(this, SUSPEND, { value: true });
  }

  toString() {
    return `${this.name}: ${this.message}`;
  }
}

// The problem type of a callback refused because the gateway has given up on its attempt.
export const SUPERSEDED_TYPE = 'https://stepgate.dev/problems/superseded';
const SUPERSEDED = Symbol.for('stepgate.superseded');

/**
 * Thrown by step calls once the gateway has given up on this attempt (protocol v1.1): it timed
 * out, a newer attempt of the run started, or the run was cancelled or has ended. The gateway
 * answered a callback 409 with the superseded problem and recorded nothing, so the handler must
 * stop: the adapter answers 409 (the gateway ignores it). Like the suspend signal it is not an
 * Error, despite its name (kept for symmetry with the error classes users catch), and it is
 * sticky: every later step call of the invocation throws it again without running its
 * function or calling back, and the adapter answers 409 whatever the handler returns.
 */
export class SupersededError {
  /**
   * @param {{ runId: string | null, attempt: number | null, currentAttempt?: number | null,
   *           runStatus?: string | null, stepId?: string | null, problem?: unknown }} fields
   */
  constructor({ runId, attempt, currentAttempt = null, runStatus = null, stepId = null, problem = null }) {
    this.name = 'SupersededError';
    this.runId = runId;
    /** This invocation's attempt number, as the gateway named it. */
    this.attempt = attempt;
    /** The attempt the run is at now, when the gateway said. */
    this.currentAttempt = currentAttempt;
    this.runStatus = runStatus;
    this.stepId = stepId;
    this.problem = problem;
    this.message = `attempt ${attempt ?? '?'} of run ${runId ?? '?'} was superseded` +
      (currentAttempt ? ` (the run is at attempt ${currentAttempt})` : '') +
      '; the gateway records nothing more from it, rethrow this signal (see isStepgateControl)';
    Object.defineProperty(this, SUPERSEDED, { value: true });
  }

  toString() {
    return `${this.name}: ${this.message}`;
  }
}

/**
 * True when `err` is the superseded signal (from any copy of this package).
 * @param {unknown} err
 * @returns {boolean}
 */
export function isSuperseded(err) {
  return typeof err === 'object' && err !== null && /** @type {any} */ (err)[SUPERSEDED] === true;
}

/**
 * True for either control signal, suspend or superseded: what a broad catch block must let
 * through, `catch (err) { rethrowIfStepgateControl(err); ... }`.
 * @param {unknown} err
 * @returns {boolean}
 */
export function isStepgateControl(err) {
  return isSuspend(err) || isSuperseded(err);
}

/**
 * Rethrows `err` if it is a control signal (suspend or superseded).
 * @param {unknown} err
 */
export function rethrowIfStepgateControl(err) {
  if (isStepgateControl(err)) throw err;
}

/**
 * True when `err` is the suspend signal. Handlers that catch broadly must rethrow it:
 * `catch (err) { if (isSuspend(err)) throw err; ... }`.
 * @param {unknown} err
 * @returns {boolean}
 */
export function isSuspend(err) {
  return typeof err === 'object' && err !== null && /** @type {any} */ (err)[SUSPEND] === true;
}

/**
 * Rethrows `err` if it is the suspend signal; a one-liner for the first line of a catch block.
 * @param {unknown} err
 */
export function rethrowIfSuspend(err) {
  if (isSuspend(err)) throw err;
}

/**
 * Whether retrying the invocation could succeed after `err`; errors that say the code or the
 * input is wrong are not.
 * @param {unknown} err
 */
export function isRetriable(err) {
  return !(err instanceof NonRetriableError || err instanceof ReplayMismatchError ||
    err instanceof StepOutputError || err instanceof StepUsageError || err instanceof StepFailedError);
}
