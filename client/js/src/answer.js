/**
 * What an adapter answers once an invocation is over: the handler's own response, or the
 * signal the gateway understands (suspend, no-retry) as an RFC 9457 problem. Pure: the adapters
 * only turn the result into node:http writes or a fetch Response.
 */

import { STATUS_CODES } from 'node:http';

import {
  NonRetriableError, SUPERSEDED_TYPE, StepFailedError, isRetriable, isStepgateControl, isSuspend,
} from './errors.js';

/**
 * @typedef {{ status: number, headers: Record<string, string>, body: string | null }} Answer
 * @typedef {{ ok: true, value: unknown } | { ok: false, error: unknown }} Outcome
 */

/**
 * @param {import('./invocation.js').Invocation} invocation
 * @param {Outcome} outcome how the handler ended
 * @returns {Answer | null} null when the handler's own response stands
 */
export function decideAnswer(invocation, outcome) {
  // Fenced: the gateway has moved on and ignores this answer; nothing else matters any more.
  if (invocation.superseded !== null) return superseded(invocation.superseded);
  // A mismatch wins over a suspension: parking would only replay into the same mismatch.
  if (invocation.fatal !== null) return problem(500, invocation.fatal.message, true);
  const error = outcome.ok ? null : outcome.error;
  // The handler chose to end the run; a sleep parked beside it must not keep it alive.
  if (error instanceof NonRetriableError) return problem(error.status, error.message, true);
  // Sticky: a handler that caught the signal and answered anyway must not end the run.
  if (invocation.suspended !== null) {
    return { status: 202, headers: { 'stepgate-suspend': 'true' }, body: null };
  }
  if (outcome.ok) return null;
  // A final step fails the same way on every replay; its recorded error may hold internals.
  if (error instanceof StepFailedError) return problem(500, `step "${error.stepId}" failed for good`, true);
  if (!isRetriable(error)) return problem(500, /** @type {Error} */ (error).message, true);
  // The message may carry internals; the gateway records the step's error in the run anyway.
  return problem(500, `unhandled ${errorType(error)} in the handler`, false);
}

/**
 * Passes what went wrong to the adapter's `onError`: the handler's error unless it is a
 * deliberate signal (suspend, NonRetriableError), and a replay mismatch even if the handler
 * caught it. Returns the guarded reporter for the adapter's own troubles.
 * @param {import('./invocation.js').Invocation} invocation
 * @param {Outcome} outcome
 * @param {(error: unknown) => void} onError
 * @returns {(error: unknown) => void}
 */
export function reportFailures(invocation, outcome, onError) {
  const report = (/** @type {unknown} */ error) => {
    try {
      onError(error);
    } catch {
      // A failing reporter must not break the answer (or crash the server).
    }
  };
  // Control signals and deliberate refusals are not failures to report; nor is anything after
  // the fence, where the handler's error is most likely the signal's consequence.
  if (!outcome.ok && !isStepgateControl(outcome.error) && invocation.superseded === null &&
      !(outcome.error instanceof NonRetriableError)) {
    report(outcome.error);
  }
  if (invocation.fatal !== null && (outcome.ok || outcome.error !== invocation.fatal)) {
    report(invocation.fatal);
  }
  return report;
}

/**
 * @param {number} status
 * @param {string} detail
 * @param {boolean} noRetry
 * @returns {Answer}
 */
function problem(status, detail, noRetry) {
  /** @type {Record<string, string>} */
  const headers = { 'content-type': 'application/problem+json' };
  if (noRetry) headers['stepgate-no-retry'] = 'true';
  const body = JSON.stringify({ type: 'about:blank', title: STATUS_CODES[status] ?? 'Error', status, detail });
  return { status, headers, body };
}

/**
 * The answer of a fenced attempt, in the gateway's own terms.
 * @param {import('./errors.js').SupersededError} signal
 * @returns {Answer}
 */
function superseded(signal) {
  const body = JSON.stringify({
    type: SUPERSEDED_TYPE, title: 'Attempt superseded', status: 409,
    detail: 'the gateway has given up on this attempt; the handler stopped',
    run_id: signal.runId, attempt: signal.attempt,
  });
  return { status: 409, headers: { 'content-type': 'application/problem+json' }, body };
}

/** @param {unknown} error */
function errorType(error) {
  if (isSuspend(error)) return 'suspend signal';
  return error instanceof Error ? error.name : `thrown ${error === null ? 'null' : typeof error}`;
}

/** @param {unknown} error */
export function defaultOnError(error) {
  console.error('stepgate: handler failed:', error);
}
