/**
 * The client side of the gateway's callback API: `GET {cb}/steps`, `PUT {cb}/steps/{id}` and
 * `POST {cb}/events`.
 *
 * Uses the global fetch (undici), which keeps connections alive and pools them per origin, so
 * the checkpoints of a busy service reuse a handful of sockets to the gateway.
 */

import { CallbackError, GatewayUnavailableError, SUPERSEDED_TYPE, SupersededError } from './errors.js';

// A callback is one small SQLite write on the gateway; a minute means it is stuck.
const CALLBACK_TIMEOUT_MS = 60_000;
// Retried only when no answer arrived (a reused keep-alive socket the gateway closed, a
// refused connection during a gateway restart). Every callback is safe to repeat: the gateway
// keeps the first output, sleeps and waits are idempotent, and a repeated error record only
// counts one more failed attempt.
const NETWORK_RETRY_DELAYS_MS = [50, 250];

export class Transport {
  /**
   * @param {{ callback: string, token: string, runId: string | null, attempt: number | null }} options
   */
  constructor({ callback, token, runId, attempt }) {
    this.base = callback.replace(/\/+$/, '');
    this.runId = runId;
    this.attempt = attempt;
    this.headers = { authorization: `Bearer ${token}`, accept: 'application/json' };
  }

  /** @returns {Promise<Array<Record<string, any>>>} the run's step records, ordered by seq */
  async getSteps() {
    const answer = await this.#call('GET', `${this.base}/steps`, undefined, null);
    if (answer === null || typeof answer !== 'object' || !Array.isArray(answer.steps)) {
      throw this.#unexpected('GET', null, answer);
    }
    return answer.steps;
  }

  /**
   * @param {string} stepId
   * @param {Record<string, unknown>} body
   * @returns {Promise<Record<string, any>>}
   */
  async putStep(stepId, body) {
    const url = `${this.base}/steps/${encodeURIComponent(stepId)}`;
    const answer = await this.#call('PUT', url, JSON.stringify(body), stepId);
    if (answer === null || typeof answer !== 'object' || typeof answer.status !== 'string') {
      throw this.#unexpected('PUT', stepId, answer);
    }
    return answer;
  }

  /**
   * `POST {cb}/events`: an event the run sends, recorded as the step `stepId`.
   * @param {string} stepId
   * @param {Record<string, unknown>} body
   * @returns {Promise<Record<string, any>>}
   */
  async postEvent(stepId, body) {
    const answer = await this.#call('POST', `${this.base}/events`, JSON.stringify(body), stepId);
    if (answer === null || typeof answer !== 'object' || typeof answer.id !== 'string') {
      throw this.#unexpected('POST', stepId, answer);
    }
    return answer;
  }

  /**
   * @param {string} method
   * @param {string | null} stepId
   * @param {unknown} answer
   */
  #unexpected(method, stepId, answer) {
    return new CallbackError(
      `stepgate callback ${method} answered an unexpected body: ${JSON.stringify(answer)}`,
      { runId: this.runId, stepId, method, status: null, problem: null });
  }

  /**
   * @param {string} method
   * @param {string} url
   * @param {string | undefined} body
   * @param {string | null} stepId
   * @returns {Promise<any>}
   */
  async #call(method, url, body, stepId) {
    const headers = body === undefined ? this.headers
      : { ...this.headers, 'content-type': 'application/json' };
    let response;
    for (let attempt = 0; ; attempt += 1) {
      try {
        response = await fetch(url, {
          method, headers, body, redirect: 'error', signal: AbortSignal.timeout(CALLBACK_TIMEOUT_MS),
        });
        break;
      } catch (err) {
        const timedOut = err instanceof Error && err.name === 'TimeoutError';
        if (!timedOut && attempt < NETWORK_RETRY_DELAYS_MS.length) {
          await new Promise((resolve) => setTimeout(resolve, NETWORK_RETRY_DELAYS_MS[attempt]));
          continue;
        }
        const why = timedOut ? `timed out after ${CALLBACK_TIMEOUT_MS} ms` : describe(err);
        throw new GatewayUnavailableError(`stepgate callback ${method} ${url} failed: ${why}`,
          { runId: this.runId, stepId, method, status: null, problem: null, cause: err });
      }
    }
    const text = await response.text();
    let parsed = null;
    try {
      parsed = text === '' ? null : JSON.parse(text);
    } catch {
      // Not JSON: reported below with the status, or as an unexpected body.
    }
    if (response.status === 409 && parsed !== null && typeof parsed === 'object' &&
        parsed.type === SUPERSEDED_TYPE) {
      // The gateway has given up on this attempt and recorded nothing (protocol v1.1).
      throw new SupersededError({
        runId: this.runId ?? (typeof parsed.run_id === 'string' ? parsed.run_id : null),
        attempt: Number.isInteger(parsed.attempt) ? parsed.attempt : this.attempt,
        currentAttempt: Number.isInteger(parsed.current_attempt) ? parsed.current_attempt : null,
        runStatus: typeof parsed.run_status === 'string' ? parsed.run_status : null,
        stepId, problem: parsed,
      });
    }
    if (!response.ok) {
      const detail = parsed !== null && typeof parsed === 'object'
        ? parsed.detail ?? parsed.title ?? '' : text.slice(0, 200);
      throw new CallbackError(
        `stepgate callback ${method} ${url} answered ${response.status}${detail ? `: ${detail}` : ''}`,
        { runId: this.runId, stepId, method, status: response.status, problem: parsed });
    }
    return parsed;
  }
}

/** @param {unknown} err */
function describe(err) {
  if (!(err instanceof Error)) return String(err);
  // undici hides the socket error (ECONNREFUSED, ...) in `cause`.
  const cause = /** @type {any} */ (err).cause;
  return cause instanceof Error ? `${err.message} (${cause.message})` : err.message;
}
