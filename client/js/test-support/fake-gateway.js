/**
 * An in-memory stand-in for the gateway's callback API (a real node:http server on loopback), plus
 * the gateway's side of an invocation: the Stepgate-* headers and a retry/resume loop. It follows
 * the step protocol strictly (400 on any malformed body) so SDK mistakes fail tests.
 *
 * Lives outside test/ because `node --test` runs every .js file under a test/ directory.
 */

import { randomBytes } from 'node:crypto';
import { createServer } from 'node:http';

const RFC3339 = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)$/;
const WIRE_DURATION = /^\d+(?:ms|s|m|h|d)$/;
const BODY_KEYS = new Set(['output', 'error', 'sleep', 'wait']);
export const SUPERSEDED_TYPE = 'https://stepgate.dev/problems/superseded';

/**
 * @typedef {{ id: string, seq: number, kind: 'run' | 'sleep' | 'wait' | 'event',
 *   status: 'completed' | 'failed' | 'sleeping' | 'waiting', output?: unknown,
 *   error?: { message: string, type?: string, retriable?: boolean }, attempts: number,
 *   final?: true, policy?: { attempts: number, initial: string, max: string, multiplier: number },
 *   until?: string, wait?: { event: string, match: Record<string, unknown>, timeout?: string } }} StepRecord
 * @typedef {{ id: string, token: string, callback: string, steps: Map<string, StepRecord>,
 *   attempt: number, finished: boolean, noRetry: boolean, fenceAt: string | null,
 *   fenced: boolean }} Run
 * @typedef {{ method: string, path: string, runId: string | null, stepId: string | null,
 *   body: any, authorization: string | undefined, status: number }} Call
 */

export class FakeGateway {
  /** @returns {Promise<FakeGateway>} */
  static async start() {
    const gateway = new FakeGateway();
    await new Promise((resolve) => gateway.server.listen(0, '127.0.0.1', () => resolve(undefined)));
    const address = /** @type {import('node:net').AddressInfo} */ (gateway.server.address());
    gateway.url = `http://127.0.0.1:${address.port}`;
    return gateway;
  }

  constructor() {
    this.url = '';
    /** @type {Map<string, Run>} */
    this.runs = new Map();
    /** @type {Call[]} every callback, in arrival order */
    this.calls = [];
    /** @type {Array<{ name: string, data: unknown, id: string, ts: string }>} */
    this.events = [];
    /**
     * Test hook: return an answer to send instead, 'destroy' to cut the connection, or undefined.
     * @type {((call: { method: string, path: string, body: any }) =>
     *   { status: number, body: unknown } | 'destroy' | undefined) | null}
     */
    this.intercept = null;
    this.server = createServer((req, res) => {
      this.#handle(req, res).catch((err) => {
        res.writeHead(500).end(String(err));
      });
    });
  }

  async close() {
    this.server.closeAllConnections();
    await new Promise((resolve) => this.server.close(() => resolve(undefined)));
  }

  /**
   * @param {{ steps?: Array<Partial<StepRecord> & { id: string }> }} [options] pre-recorded steps
   * @returns {Run}
   */
  createRun({ steps = [] } = {}) {
    const id = randomBytes(16).toString('base64url');
    /** @type {Run} */
    const run = {
      id, token: randomBytes(16).toString('base64url'), callback: `${this.url}/v1/runs/${id}`,
      steps: new Map(), attempt: 0, finished: false, noRetry: false, fenceAt: null, fenced: false,
    };
    steps.forEach((step, index) => {
      run.steps.set(step.id, { seq: index, kind: 'run', status: 'completed', attempts: 1, ...step });
    });
    this.runs.set(id, run);
    return run;
  }

  /**
   * Plays the gateway giving up on the run's current attempt (protocol v1.1): from the callback
   * `at` on ("PUT <step id>" or "GET steps"), every callback is refused with the 409 superseded
   * problem and records nothing.
   * @param {Run} run
   * @param {string} at
   */
  fence(run, at) {
    run.fenceAt = at;
  }

  /** @param {Run} run the steps in seq order */
  stepsOf(run) {
    return [...run.steps.values()].sort((a, b) => a.seq - b.seq);
  }

  /** @param {Run} run the Stepgate-* headers of the run's next invocation */
  headersFor(run) {
    run.attempt += 1;
    return {
      'stepgate-run-id': run.id,
      'stepgate-attempt': String(run.attempt),
      'stepgate-callback': run.callback,
      'stepgate-token': run.token,
      'stepgate-steps': String(run.steps.size),
    };
  }

  /** @param {Run} run callbacks made for this run */
  callsOf(run) {
    return this.calls.filter((call) => call.runId === run.id);
  }

  /**
   * What the gateway does when parked steps fall due: sleeps complete, waits time out (null) unless
   * an output is given.
   * @param {Run} run
   * @param {Record<string, unknown>} [outputs] wait outputs by step id
   */
  wake(run, outputs = {}) {
    for (const record of run.steps.values()) {
      if (record.status === 'sleeping') record.status = 'completed';
      if (record.status === 'waiting') {
        record.status = 'completed';
        record.output = outputs[record.id] ?? null;
      }
    }
  }

  /**
   * Sends an event: matching waits complete with it; later waits find it in the lookback list.
   * @param {string} name
   * @param {unknown} data
   */
  sendEvent(name, data) {
    const event = { name, data, id: randomBytes(8).toString('hex'), ts: new Date().toISOString() };
    this.events.push(event);
    for (const run of this.runs.values()) {
      for (const record of run.steps.values()) {
        if (record.status === 'waiting' && record.wait && matches(record.wait, event)) {
          record.status = 'completed';
          record.output = event;
        }
      }
    }
    return event;
  }

  /**
   * @param {import('node:http').IncomingMessage} req
   * @param {import('node:http').ServerResponse} res
   */
  async #handle(req, res) {
    const chunks = [];
    for await (const chunk of req) chunks.push(chunk);
    const text = Buffer.concat(chunks).toString('utf8');
    const url = new URL(req.url ?? '/', this.url);
    const route = /^\/v1\/runs\/([^/]+)\/steps(?:\/([^/]+))?$/.exec(url.pathname) ??
      /^\/v1\/runs\/([^/]+)\/(events)$/.exec(url.pathname);
    let body;
    try {
      body = text === '' ? undefined : JSON.parse(text);
    } catch {
      body = Symbol.for('malformed');
    }
    /** @type {Call} */
    const call = {
      method: req.method ?? '', path: url.pathname, runId: route?.[1] ?? null,
      stepId: route?.[2] === undefined ? null : safeDecode(route[2]), body,
      authorization: req.headers.authorization, status: 0,
    };
    this.calls.push(call);
    const send = (/** @type {number} */ status, /** @type {unknown} */ payload, problem = false) => {
      call.status = status;
      res.writeHead(status, { 'content-type': problem ? 'application/problem+json' : 'application/json' });
      res.end(JSON.stringify(payload));
    };
    const fail = (/** @type {number} */ status, /** @type {string} */ detail) =>
      send(status, { type: 'about:blank', title: String(status), status, detail }, true);

    const override = this.intercept?.({ method: call.method, path: call.path, body });
    if (override === 'destroy') {
      call.status = -1;
      req.socket.destroy();
      return;
    }
    if (override !== undefined) {
      send(override.status, override.body, override.status >= 400);
      return;
    }

    if (route === null) return fail(404, 'no such endpoint');
    if (!req.headers.authorization) return fail(401, 'missing bearer token');
    const run = this.runs.get(route[1]);
    if (run === undefined) return fail(404, 'unknown run');
    if (req.headers.authorization !== `Bearer ${run.token}`) return fail(401, 'wrong token');
    if (run.fenceAt === `${req.method} ${route[2] === undefined ? 'steps' : call.stepId}`) run.fenced = true;
    if (run.fenced) {
      return send(409, {
        type: SUPERSEDED_TYPE, title: 'Attempt superseded', status: 409,
        detail: `attempt ${run.attempt} was superseded`, run_id: run.id, attempt: run.attempt,
        current_attempt: run.attempt + 1, run_status: 'running',
      }, true);
    }
    if (route[2] === undefined) {
      if (req.method !== 'GET') return fail(405, 'GET only');
      const steps = this.stepsOf(run).map(({ until, wait, policy, ...record }) => record);
      return send(200, { steps });
    }
    if (url.pathname.endsWith('/events')) return this.#sendEvent(req, run, body, send, fail);
    if (req.method !== 'PUT') return fail(405, 'PUT only');
    const stepId = call.stepId;
    if (stepId === null || [...stepId].length === 0 || [...stepId].length > 256) {
      return fail(400, 'bad step id');
    }
    if (req.headers['content-type'] !== 'application/json') return fail(400, 'JSON body expected');
    const problem = validate(body);
    if (problem !== null) return fail(400, problem);
    if (run.finished) return fail(409, 'run finished');

    const seq = body.seq ?? run.steps.size;
    const existing = run.steps.get(stepId);
    if (existing?.final) {
      return send(200, { status: 'failed', attempts: existing.attempts, final: true });
    }
    if ('output' in body) {
      if (existing?.status === 'completed') return send(200, { status: 'completed', output: existing.output });
      run.steps.set(stepId, {
        id: stepId, seq, kind: 'run', status: 'completed', output: body.output,
        attempts: (existing?.attempts ?? 0) + 1,
      });
      return send(201, { status: 'completed', output: body.output });
    }
    if ('error' in body) {
      /** @type {StepRecord} */
      const record = existing ?? { id: stepId, seq, kind: 'run', status: 'failed', attempts: 0 };
      record.attempts += 1;
      if (record.status !== 'completed') {
        record.status = 'failed';
        record.error = body.error;
      }
      if (body.error.retriable === false) run.noRetry = true;
      if (record.status === 'failed' && body.policy !== undefined) {
        record.policy = body.policy;
        if (record.attempts >= body.policy.attempts) record.final = true;
      }
      run.steps.set(stepId, record);
      return send(200, record.final
        ? { status: record.status, attempts: record.attempts, final: true }
        : { status: record.status, attempts: record.attempts });
    }
    if ('sleep' in body) {
      if (existing !== undefined) return send(200, { status: existing.status });
      const due = Date.parse(body.sleep.until) <= Date.now();
      run.steps.set(stepId, {
        id: stepId, seq, kind: 'sleep', status: due ? 'completed' : 'sleeping', attempts: 1,
        until: body.sleep.until,
      });
      return send(200, { status: due ? 'completed' : 'sleeping' });
    }
    // wait
    if (existing !== undefined) {
      return send(200, existing.status === 'completed'
        ? { status: 'completed', output: existing.output ?? null } : { status: existing.status });
    }
    const early = this.events.find((event) => matches(body.wait, event));
    run.steps.set(stepId, {
      id: stepId, seq, kind: 'wait', status: early ? 'completed' : 'waiting', attempts: 1,
      output: early ?? undefined, wait: body.wait,
    });
    return send(200, early ? { status: 'completed', output: early } : { status: 'waiting' });
  }

  /**
   * `POST {cb}/events`: an event the run sends, recorded as its step; sent once.
   * @param {import('node:http').IncomingMessage} req
   * @param {Run} run
   * @param {any} body
   * @param {(status: number, payload: unknown) => void} send
   * @param {(status: number, detail: string) => void} fail
   */
  #sendEvent(req, run, body, send, fail) {
    if (req.method !== 'POST') return fail(405, 'POST only');
    if (typeof body !== 'object' || body === null || typeof body.name !== 'string' ||
        typeof body.step !== 'string' || !Number.isInteger(body.seq)) {
      return fail(400, 'name, step and seq expected');
    }
    const unknown = Object.keys(body).filter((key) => !['name', 'data', 'step', 'seq'].includes(key));
    if (unknown.length > 0) return fail(400, `unknown keys ${unknown.join(', ')}`);
    const existing = run.steps.get(body.step);
    if (existing !== undefined) {
      if (existing.kind !== 'event') return fail(409, 'recorded as another kind');
      return send(200, { id: /** @type {any} */ (existing.output).id });
    }
    const id = `ev-${run.id}-${body.step}`;
    this.events.push({ name: body.name, data: body.data ?? null, id, ts: new Date().toISOString() });
    run.steps.set(body.step, {
      id: body.step, seq: body.seq, kind: 'event', status: 'completed', output: { id, name: body.name },
      attempts: 0,
    });
    return send(201, { id, woke: 0 });
  }
}

/**
 * Plays the gateway's side of a run against `target` (a URL or a fetch-style function): invoke,
 * re-invoke after a suspension (waking parked steps first) or a retriable failure, until a final
 * answer or `attempts` failed invocations.
 * @param {FakeGateway} gateway
 * @param {Run} run
 * @param {string | ((request: Request) => Promise<Response>)} target
 * @param {{ method?: string, body?: string, headers?: Record<string, string>, attempts?: number,
 *   beforeResume?: (run: Run) => void }} [options]
 */
export async function drive(gateway, run, target, options = {}) {
  const { attempts = 4, beforeResume = (/** @type {Run} */ parked) => gateway.wake(parked) } = options;
  /** @type {Array<{ status: number, suspend: boolean, noRetry: boolean }>} */
  const history = [];
  let failures = 0;
  for (let invocation = 0; invocation < 50; invocation += 1) {
    const response = await invoke(gateway, run, target, options);
    const text = await response.text();
    const suspend = response.headers.get('stepgate-suspend') === 'true';
    const noRetry = response.headers.get('stepgate-no-retry') === 'true';
    history.push({ status: response.status, suspend, noRetry });
    if (response.status === 202 && suspend) {
      beforeResume(run);
      continue;
    }
    if (response.status >= 500 && !noRetry && !run.noRetry) {
      failures += 1;
      if (failures < attempts) continue;
    }
    run.finished = true;
    return { status: response.status, headers: response.headers, text, history };
  }
  throw new Error('drive: the run did not finish in 50 invocations');
}

/**
 * One invocation of `target` with the run's headers (`headers` may override them).
 * @param {FakeGateway} gateway
 * @param {Run} run
 * @param {string | ((request: Request) => Promise<Response>)} target
 * @param {{ method?: string, body?: string, headers?: Record<string, string> }} [options]
 */
export async function invoke(gateway, run, target, { method = 'POST', body = '{}', headers = {} } = {}) {
  const init = {
    method, body: method === 'GET' ? undefined : body,
    headers: { 'content-type': 'application/json', ...gateway.headersFor(run), ...headers },
  };
  if (typeof target === 'string') return fetch(target, init);
  return target(new Request('http://upstream.test/', init));
}

/** @param {string} text */
function safeDecode(text) {
  try {
    return decodeURIComponent(text);
  } catch {
    return null;
  }
}

/**
 * @param {any} body
 * @returns {string | null} what is wrong with a PUT body, or null
 */
function validate(body) {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) return 'body must be an object';
  const kinds = Object.keys(body).filter((key) => BODY_KEYS.has(key));
  if (kinds.length !== 1) return 'exactly one of output, error, sleep, wait';
  const unknown = Object.keys(body).filter((key) => !BODY_KEYS.has(key) && key !== 'seq' && key !== 'policy');
  if (unknown.length > 0) return `unknown keys ${unknown.join(', ')}`;
  if ('policy' in body) {
    const { policy } = body;
    if (!('error' in body)) return 'policy goes only with an error';
    if (typeof policy !== 'object' || policy === null || !Number.isInteger(policy.attempts) || policy.attempts < 1) {
      return 'policy.attempts must be a whole number of at least 1';
    }
    const keys = Object.keys(policy).filter((key) => !['attempts', 'initial', 'max', 'multiplier'].includes(key));
    if (keys.length > 0) return `unknown policy keys ${keys.join(', ')}`;
    for (const key of ['initial', 'max']) {
      if (key in policy && !(typeof policy[key] === 'string' && WIRE_DURATION.test(policy[key]))) {
        return `policy.${key} must be a duration`;
      }
    }
    if ('multiplier' in policy && typeof policy.multiplier !== 'number') return 'policy.multiplier must be a number';
  }
  if ('seq' in body && !(Number.isInteger(body.seq) && body.seq >= 0)) return 'seq must be an integer >= 0';
  if ('error' in body) {
    const { error } = body;
    if (typeof error !== 'object' || error === null || typeof error.message !== 'string') {
      return 'error.message must be a string';
    }
    if ('type' in error && typeof error.type !== 'string') return 'error.type must be a string';
    if ('retriable' in error && typeof error.retriable !== 'boolean') return 'error.retriable must be a boolean';
  }
  if ('sleep' in body && !(typeof body.sleep?.until === 'string' && RFC3339.test(body.sleep.until))) {
    return 'sleep.until must be RFC 3339 with an offset';
  }
  if ('wait' in body) {
    const { wait } = body;
    if (typeof wait?.event !== 'string' || wait.event === '') return 'wait.event must be a string';
    if ('match' in wait && (typeof wait.match !== 'object' || wait.match === null)) return 'wait.match must be an object';
    if ('timeout' in wait && !(typeof wait.timeout === 'string' && WIRE_DURATION.test(wait.timeout))) {
      return 'wait.timeout must be a duration';
    }
  }
  return null;
}

/**
 * @param {{ event: string, match?: Record<string, unknown> }} wait
 * @param {{ name: string }} event
 */
function matches(wait, event) {
  if (wait.event !== event.name) return false;
  return Object.entries(wait.match ?? {}).every(([path, expected]) => {
    /** @type {any} */
    let value = event;
    for (const part of path.split('.')) value = value?.[part];
    return JSON.stringify(value) === JSON.stringify(expected);
  });
}
