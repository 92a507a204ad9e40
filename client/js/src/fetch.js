/**
 * The adapter for fetch-style handlers `(request: Request, ...rest) => Response | Promise<Response>`
 * (Hono, itty-router, Bun.serve, Deno.serve, web-standard route handlers).
 */

import { decideAnswer, defaultOnError, reportFailures } from './answer.js';
import { Invocation } from './invocation.js';

/**
 * Wraps a fetch-style handler so its steps checkpoint through the gateway. The returned function
 * never rejects: errors become problem+json Responses and are passed to `onError` (default: the
 * console), suspension becomes `202` with `Stepgate-Suspend: true`.
 * @template {any[]} Rest
 * @param {(request: Request, ...rest: Rest) => Response | Promise<Response>} handler
 * @param {{ onError?: (error: unknown) => void }} [options]
 * @returns {(request: Request, ...rest: Rest) => Promise<Response>}
 */
export function wrapFetchHandler(handler, { onError = defaultOnError } = {}) {
  if (typeof handler !== 'function') throw new TypeError('wrapFetchHandler needs a handler function');
  /**
   * @this {unknown} whatever the caller binds (an app object), passed on to the handler
   * @param {Request} request
   * @param {Rest} rest
   */
  return async function stepgateFetchHandler(request, ...rest) {
    const invocation = Invocation.fromHeaders((name) => request.headers.get(name));
    const outcome = await invocation.execute(() => handler.call(this, request, ...rest));
    reportFailures(invocation, outcome, onError);
    const answer = decideAnswer(invocation, outcome);
    if (answer === null) return /** @type {Response} */ (/** @type {{ value: unknown }} */ (outcome).value);
    if (outcome.ok && outcome.value instanceof Response && !outcome.value.bodyUsed) {
      // The handler's own response is discarded; release its body stream.
      outcome.value.body?.cancel().catch(() => {});
    }
    return new Response(answer.body, { status: answer.status, headers: answer.headers });
  };
}
