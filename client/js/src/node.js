/**
 * The adapter for node:http style handlers `(req, res) => void | Promise<void>` (also Express and
 * anything else that passes a ServerResponse).
 */

import { decideAnswer, defaultOnError, reportFailures } from './answer.js';
import { Invocation } from './invocation.js';

/**
 * @typedef {import('node:http').IncomingMessage} IncomingMessage
 * @typedef {import('node:http').ServerResponse} ServerResponse
 * @typedef {{ onError?: (error: unknown) => void }} WrapOptions
 */

/**
 * Wraps a node:http handler so its steps checkpoint through the gateway. The returned function
 * never rejects: errors become problem+json answers and are passed to `onError` (default: the
 * console), suspension becomes `202` with `Stepgate-Suspend: true`.
 * @template {any[]} Rest
 * @param {(req: IncomingMessage, res: ServerResponse, ...rest: Rest) => unknown} handler
 * @param {WrapOptions} [options]
 * @returns {(req: IncomingMessage, res: ServerResponse, ...rest: Rest) => Promise<void>}
 */
export function wrapNodeHandler(handler, { onError = defaultOnError } = {}) {
  if (typeof handler !== 'function') throw new TypeError('wrapNodeHandler needs a handler function');
  /**
   * @this {unknown} whatever the caller binds (Express binds nothing), passed on to the handler
   * @param {IncomingMessage} req
   * @param {ServerResponse} res
   * @param {Rest} rest
   */
  return async function stepgateNodeHandler(req, res, ...rest) {
    const invocation = Invocation.fromHeaders((name) => firstValue(req.headers[name]));
    const guard = new ResponseGuard(res);
    // From the moment a step suspends or mismatches, the answer is the SDK's, not the handler's.
    invocation.onInterrupt(() => guard.hold());
    const outcome = await invocation.execute(async () => {
      const returned = handler.call(this, req, res, ...rest);
      if (isThenable(returned)) return await returned;
      // A callback-style handler is done when its response is, or when a step interrupts it.
      if (!res.writableEnded) await untilEndedOrInterrupted(res, invocation);
      return returned;
    });
    guard.release();
    const report = reportFailures(invocation, outcome, onError);
    const answer = decideAnswer(invocation, outcome);
    if (answer === null) return;
    if (res.headersSent) {
      report(new Error(`stepgate: cannot answer ${answer.status}: the handler had already sent ` +
        'response headers; write the response only after the last step'));
      // A cut-off response makes the gateway retry; a complete one would be taken as final.
      if (!res.writableEnded) res.destroy();
      return;
    }
    try {
      for (const name of res.getHeaderNames()) res.removeHeader(name);
      const body = answer.body ?? '';
      res.writeHead(answer.status, { ...answer.headers, 'content-length': Buffer.byteLength(body) });
      res.end(body);
    } catch (err) {
      report(err);
    }
  };
}

/** @param {string | string[] | undefined} value */
function firstValue(value) {
  return Array.isArray(value) ? value[0] : value;
}

/** @param {unknown} value */
function isThenable(value) {
  return typeof value === 'object' && value !== null &&
    typeof (/** @type {any} */ (value).then) === 'function';
}

/**
 * @param {ServerResponse} res
 * @param {Invocation} invocation
 * @returns {Promise<void>}
 */
function untilEndedOrInterrupted(res, invocation) {
  return new Promise((resolve) => {
    const done = () => {
      res.off('finish', done);
      res.off('close', done);
      resolve();
    };
    res.on('finish', done);
    res.on('close', done);
    invocation.onInterrupt(done);
  });
}

// Everything that could start or shape the response.
const WRITERS = ['writeHead', 'setHeader', 'setHeaders', 'appendHeader', 'removeHeader', 'write',
  'end', 'flushHeaders', 'writeContinue', 'writeProcessing', 'writeEarlyHints', 'addTrailers'];

/**
 * Silences a ServerResponse while the SDK owns the answer, so a handler that caught the suspend
 * signal (a bare `catch`) cannot send its own. Shadows the writers on the instance and restores
 * exactly what was there (middleware such as compression patch `write`/`end` on the instance).
 */
class ResponseGuard {
  /** @param {ServerResponse} res */
  constructor(res) {
    this.res = res;
    /** @type {Map<string, PropertyDescriptor | undefined> | null} */
    this.saved = null;
  }

  hold() {
    if (this.saved !== null || this.res.headersSent) return;
    const res = /** @type {any} */ (this.res);
    this.saved = new Map();
    for (const name of WRITERS) {
      if (typeof res[name] !== 'function') continue;
      this.saved.set(name, Object.getOwnPropertyDescriptor(res, name));
      Object.defineProperty(res, name, {
        configurable: true, writable: true, value: silenced(res, name),
      });
    }
  }

  release() {
    if (this.saved === null) return;
    const res = /** @type {any} */ (this.res);
    for (const [name, descriptor] of this.saved) {
      if (descriptor === undefined) delete res[name];
      else Object.defineProperty(res, name, descriptor);
    }
    this.saved = null;
  }
}

/**
 * A writer that does nothing but keep the caller's control flow going: it calls a trailing
 * callback and returns what the real one would (the response for chaining, true for write).
 * @param {any} res
 * @param {string} name
 */
function silenced(res, name) {
  return (/** @type {unknown[]} */ ...args) => {
    const callback = args.findLast((arg) => typeof arg === 'function');
    if ((name === 'write' || name === 'end') && typeof callback === 'function') {
      queueMicrotask(() => callback());
    }
    if (name === 'write') return true;
    if (name === 'removeHeader' || name === 'flushHeaders' || name === 'addTrailers') return undefined;
    return res;
  };
}
