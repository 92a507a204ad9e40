// A trip-booking service whose four steps are durable behind Stepgate (the JavaScript twin of
// the Python example).
//
//   POST /trips  {"traveller", "flight", "hotel"}   books a trip:
//                reserve-flight and reserve-hotel (in parallel), charge-card, send-confirmation
//                reserve-hotel has a policy of its own: 2 retries, a back-off from 100 ms up to
//                400 ms, 10 s an attempt. When its attempts are spent the handler catches
//                StepFailedError, refunds the flight (step refund-flight) and answers 409.
//        ?fail=STEP         STEP throws once per run (the run is told by Stepgate-Run-Id)
//        ?fail=STEP:N       STEP throws on its first N attempts in a run
//        ?fail=STEP:always  STEP throws on every attempt
//        ?fail=STEP:fatal   STEP throws NonRetriableError (422): the run ends at once
//        ?hotel_timeout=SECONDS
//                           reserve-hotel's time-out (default 10): a slower attempt is cut off
//        ?announce=1        after the charge, send the event trip.booked (step.sendEvent, sent
//                           once however often the run is replayed); the answer's "announced"
//                           is its event id
//        ?cooloff=SECONDS   a durable pause before the card is charged
//        ?await=payment[:SECONDS]
//                           before the charge, wait (default up to 3600 s) for the event
//                           trip.paid whose data.trip is the run id; the answer's "payment"
//                           is that event, or null when the wait timed out
//        ?approval=SECONDS  the trip is over budget: before the charge a manager must approve it
//                           through a link (a signal, valid SECONDS) that the step mail-approver
//                           "mails" (prints); POST {"approved": true} to it. Anything else, or
//                           no answer in time, declines the trip (403)
//        ?insure=1          travel insurance from POST /insurance (a durable route of its own),
//                           run as a child run of the booking: its answer is the booking's
//                           "insurance"; ?insure=decline makes the insurer refuse (422), and the
//                           booking goes on with {"declined": 422}
//        ?latency=SECONDS   each reservation takes this long to succeed (a failing one fails at
//                           once); the two run concurrently
//        ?drift=1           from attempt 2 on, charge-card is called charge-card-v2, as if the
//                           code changed under the run: the SDK refuses the replay (500, no retry)
//        ?stall=STEP:SECONDS
//                           STEP takes SECONDS the first time it runs in a run (repeatable):
//                           longer than the route's timeout, the gateway gives up on the attempt
//                           and starts the next; the stalled handler's late step is refused
//                           (the attempt is fenced) and it stops there
//   POST /insurance  {"traveller", "flight", "decline"?}   a quote, as the step quote-insurance
//   GET  /stats  how many times each step's function ran (refund-flight too): a retried run
//                re-runs only the failed step, so with ?fail=charge-card every count is 1
//                except charge-card's 2
//
// TRIP_FAIL in the environment (e.g. TRIP_FAIL=charge-card,send-confirmation:always) adds
// failures to every request.
//
// Run: node examples/js/trip_service.mjs [--port 3000] [--host 127.0.0.1]   (PORT also works)
// and put the gateway in front: stepgate serve --config config.example.yaml
// Outside this repository, import from '@stepgate/client' instead of the relative path.

import { randomBytes, randomUUID } from 'node:crypto';
import { createServer } from 'node:http';
import { setTimeout as delay } from 'node:timers/promises';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';

import { NonRetriableError, StepFailedError, step, wrapNodeHandler } from '../../client/js/src/index.js';

export const STEPS = Object.freeze(['reserve-flight', 'reserve-hotel', 'charge-card', 'send-confirmation',
  'refund-flight']);
// The hotel's booking system is flaky: retry it quickly, on its own budget.
const HOTEL_RETRIES = 2;
const HOTEL_BACKOFF = Object.freeze({ initial: '100ms', max: '400ms' });
const MAX_BODY_BYTES = 64 * 1024;
const TRIP_PRICE_CENTS = 42_000;
const FATAL_STATUS = 422; // ?fail=STEP:fatal

/**
 * Builds the service; `executions` is the live counter behind GET /stats.
 * @param {{ onError?: (error: unknown) => void }} [options] where unexpected errors are reported
 * @returns {{ server: import('node:http').Server, executions: Record<string, number> }}
 */
export function createTripService(options = {}) {
  /** @type {Record<string, number>} */
  const executions = Object.fromEntries(STEPS.map((name) => [name, 0]));
  /** @type {Map<string, number>} "runId:step" → failures so far, for ?fail=STEP[:N]. */
  const failedTimes = new Map();
  // "runId:step" pairs that already stalled once, for ?stall=STEP:SECONDS.
  const stalledOnce = new Set();

  /**
   * @param {import('node:http').IncomingMessage} req
   * @param {import('node:http').ServerResponse} res
   */
  async function handle(req, res) {
    const url = new URL(req.url ?? '/', 'http://localhost');
    if (url.pathname === '/stats' && req.method === 'GET') return sendJson(res, 200, executions);
    if (url.pathname === '/insurance' && req.method === 'POST') return insurance(req, res);
    if (url.pathname !== '/trips') throw new NonRetriableError(`no route for ${url.pathname}`, { status: 404 });
    if (req.method !== 'POST') throw new NonRetriableError('use POST /trips', { status: 405 });

    const trip = parseTrip(await readBody(req));
    const failures = parseFailures([...url.searchParams.getAll('fail'),
      ...(process.env.TRIP_FAIL ?? '').split(',').filter(Boolean)]);
    const cooloff = parseCooloff(url.searchParams.get('cooloff') ?? '0');
    const paymentTimeout = parseAwait(url.searchParams.get('await'));
    const approvalTimeout = parseApproval(url.searchParams.get('approval'));
    const insure = parseInsure(url.searchParams.get('insure'));
    const latency = parseSeconds('latency', url.searchParams.get('latency') ?? '0', 60);
    const drift = parseDrift(url.searchParams.get('drift') ?? '0');
    const stalls = parseStalls(url.searchParams.getAll('stall'));
    const hotelTimeout = parseSeconds('hotel_timeout', url.searchParams.get('hotel_timeout') ?? '10', 60);
    const announce = parseFlag('announce', url.searchParams.get('announce') ?? '0');
    // Outside the gateway there is no run: every request is its own.
    const runKey = String(req.headers['stepgate-run-id'] ?? randomUUID());
    const attempt = Number(req.headers['stepgate-attempt'] ?? 1);
    // ?drift=1: from attempt 2 on the record no longer fits the code (see the header).
    const drifted = drift && attempt >= 2 ? 'charge-card' : null;

    /**
     * A step that counts its executions, fails when ?fail asks it to, else takes `takes` s.
     * @template T
     * @param {string} name
     * @param {() => T} work
     * @param {{ takes?: number, policy?: import('../../client/js/src/index.js').StepOptions }} [options]
     *   `policy`: the step's own retries, backoff and timeout
     */
    const bookingStep = (name, work, { takes = 0, policy = {} } = {}) => {
      const id = name === drifted ? `${name}-v2` : name;
      return step.run(id, policy, async () => {
        executions[name] += 1;
        const mode = failures.get(name);
        if (mode === 'fatal') {
          throw new NonRetriableError(`${name} failed for good (fail=${name}:fatal)`, { status: FATAL_STATUS });
        }
        if (mode === 'always') throw new Error(`${name} failed (fail=${name}:always)`);
        const failed = failedTimes.get(`${runKey}:${name}`) ?? 0;
        if (typeof mode === 'number' && failed < mode) {
          failedTimes.set(`${runKey}:${name}`, failed + 1);
          if (mode === 1) throw new Error(`${name} failed once for this run (fail=${name})`);
          throw new Error(`${name} failed, ${failed + 1} of ${mode} (fail=${name}:${mode})`);
        }
        // After the failures: a failing call fails fast, as they tend to.
        if (takes > 0) await delay(takes * 1000);
        const stall = stalls.get(name);
        if (stall !== undefined && !stalledOnce.has(`${runKey}:${name}`)) {
          stalledOnce.add(`${runKey}:${name}`);
          await delay(stall * 1000);
        }
        return work();
      });
    };

    // Random references are made inside the steps: a replay returns the recorded ones. Both are
    // settled before going on: the flight's outcome is needed to undo it.
    const [flightOutcome, hotelOutcome] = await Promise.allSettled([
      bookingStep('reserve-flight', () => ({ flight: trip.flight, reference: reference('FL') }), { takes: latency }),
      bookingStep('reserve-hotel', () => ({ hotel: trip.hotel, reference: reference('HT') }), {
        takes: latency,
        policy: { retries: HOTEL_RETRIES, backoff: HOTEL_BACKOFF, timeout: hotelTimeout * 1000 },
      }),
    ]);
    if (hotelOutcome.status === 'rejected' && hotelOutcome.reason instanceof StepFailedError &&
        flightOutcome.status === 'fulfilled') {
      // No hotel however often it is tried: undo the flight, in a step of its own (recorded,
      // so a replay does not refund twice), and tell the client.
      const booked = flightOutcome.value;
      const refund = await bookingStep('refund-flight', () => ({ flight: booked.reference, refund: reference('RF') }));
      const failed = hotelOutcome.reason;
      return sendJson(res, 409, {
        traveller: trip.traveller, error: `no hotel: ${failed.error?.message ?? failed.message}`, refund,
      });
    }
    for (const outcome of [flightOutcome, hotelOutcome]) {
      if (outcome.status === 'rejected') throw outcome.reason;
    }
    const flight = /** @type {PromiseFulfilledResult<any>} */ (flightOutcome).value;
    const hotel = /** @type {PromiseFulfilledResult<any>} */ (hotelOutcome).value;
    if (cooloff > 0) {
      // Durable: under the gateway the run is parked and no process sleeps.
      await step.sleep('cool-off', cooloff * 1000);
    }
    /** @type {Record<string, unknown>} */
    const extra = {};
    if (paymentTimeout !== null) {
      // Durable too: the run is parked until the event arrives or the wait times out.
      extra.payment = await step.waitForEvent('payment', {
        event: 'trip.paid', match: { 'data.trip': runKey }, timeout: paymentTimeout * 1000,
      });
    }
    if (approvalTimeout !== null) extra.approval = await getApproval(trip, approvalTimeout);
    if (insure !== null) extra.insurance = await insureTrip(trip, insure === 'decline');
    const charge = await bookingStep('charge-card', () => ({
      reference: reference('CH'), amount_cents: TRIP_PRICE_CENTS, traveller: trip.traveller,
    }));
    if (announce) {
      // Sent once: a replay (after a failed confirmation, say) gets the recorded id back.
      extra.announced = await step.sendEvent('trip.booked', { trip: runKey, traveller: trip.traveller });
    }
    const confirmation = await bookingStep('send-confirmation', () => ({
      to: trip.traveller,
      text: `Flight ${flight.reference}, hotel ${hotel.reference}, charge ${charge.reference}`,
    }));
    sendJson(res, 200, { traveller: trip.traveller, flight, hotel, charge, confirmation, ...extra });
  }

  return { server: createServer(wrapNodeHandler(handle, options)), executions };
}

/**
 * A manager's yes, through a single-use link: the run is parked until it is POSTed to.
 * @param {{ traveller: string }} trip
 * @param {number} timeout seconds
 */
async function getApproval(trip, timeout) {
  const approval = await step.signal('approval', { timeout: timeout * 1000 });
  await step.run('mail-approver', () => {
    // A real service would send a mail; this one prints the link for the README's walk-through.
    console.log(`approval needed for ${trip.traveller}'s trip: POST ${approval.url}`);
    return { to: 'manager@example.com', url: approval.url };
  });
  /** @type {any} */
  const decision = await approval.wait(); // the POSTed JSON, or null after the time-out
  if (decision?.approved !== true) {
    const why = decision === null ? 'no approval came in time' : 'the manager declined it';
    throw new NonRetriableError(`the trip was not approved: ${why}`, { status: 403 });
  }
  return { url: approval.url, decision };
}

/**
 * A quote from the insurance route, as a child run: started once, however often this run is
 * replayed, and this run is parked until it has answered.
 * @param {{ traveller: string, flight: string }} trip
 * @param {boolean} decline
 */
async function insureTrip(trip, decline) {
  const body = { traveller: trip.traveller, flight: trip.flight, decline };
  try {
    return await step.invoke('insure', { route: 'insurance', body });
  } catch (err) {
    // The child run ended failed: book without insurance.
    if (err instanceof StepFailedError) return { declined: err.status };
    throw err;
  }
}

/**
 * The insurer: a durable route of its own, here invoked by the booking.
 * @param {import('node:http').IncomingMessage} req
 * @param {import('node:http').ServerResponse} res
 */
async function insurance(req, res) {
  const body = JSON.parse(await readBody(req));
  const quote = await step.run('quote-insurance', () => {
    if (body.decline) throw new NonRetriableError(`no cover for ${body.traveller}`, { status: 422 });
    return { policy: reference('IN'), flight: body.flight, premium_cents: 1_900 };
  });
  sendJson(res, 200, quote);
}

/** @param {import('node:http').IncomingMessage} req */
async function readBody(req) {
  const chunks = [];
  let size = 0;
  // `for await` keeps the handler's async context (and so its run) for the steps that follow;
  // req.on('end', ...) callbacks would not.
  for await (const chunk of req) {
    size += chunk.length;
    if (size > MAX_BODY_BYTES) throw new NonRetriableError('request body too large', { status: 413 });
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

/**
 * @param {string} text
 * @returns {{ traveller: string, flight: string, hotel: string }}
 */
function parseTrip(text) {
  let body;
  try {
    body = JSON.parse(text);
  } catch {
    throw new NonRetriableError('the body must be JSON', { status: 400 });
  }
  for (const field of ['traveller', 'flight', 'hotel']) {
    if (typeof body?.[field] !== 'string' || body[field] === '') {
      throw new NonRetriableError(`"${field}" must be a non-empty string`, { status: 400 });
    }
  }
  return { traveller: body.traveller, flight: body.flight, hotel: body.hotel };
}

/**
 * @param {string[]} values ?fail=STEP, ?fail=STEP:N, ?fail=STEP:always or ?fail=STEP:fatal, repeatable
 * @returns {Map<string, number | 'always' | 'fatal'>} how each step fails ("once" is 1)
 */
function parseFailures(values) {
  const failures = new Map();
  for (const value of values) {
    const [name, mode = 'once', ...rest] = value.trim().split(':');
    const count = /^[0-9]{1,3}$/.test(mode) ? Number(mode) : null;
    if (!STEPS.includes(name) || (!['once', 'always', 'fatal'].includes(mode) && count === null) ||
        rest.length > 0) {
      throw new NonRetriableError(`fail=${value}: expected STEP, STEP:N, STEP:always or STEP:fatal, STEP one of ` +
        STEPS.join(', '), { status: 400 });
    }
    failures.set(name, count ?? (mode === 'once' ? 1 : mode));
  }
  return failures;
}

/**
 * @param {string} knob
 * @param {string} value "0" or "1"
 */
function parseFlag(knob, value) {
  if (value !== '0' && value !== '1') {
    throw new NonRetriableError(`${knob}=${value}: expected 0 or 1`, { status: 400 });
  }
  return value === '1';
}

/**
 * @param {string} value ?cooloff=SECONDS
 * @returns {number} seconds, 0 to 3600
 */
function parseCooloff(value) {
  return parseSeconds('cooloff', value, 3600);
}

/**
 * @param {string} knob the query parameter, for the error message
 * @param {string} value
 * @param {number} most
 * @returns {number} seconds, 0 to `most`
 */
function parseSeconds(knob, value, most) {
  const seconds = value.trim() === '' ? Number.NaN : Number(value);
  if (!(seconds >= 0 && seconds <= most)) {
    throw new NonRetriableError(`${knob}=${value}: expected seconds from 0 to ${most}`, { status: 400 });
  }
  return seconds;
}

/**
 * @param {string | null} value ?await=payment[:SECONDS]
 * @returns {number | null} how long to wait for the payment event, in seconds; null: no wait
 */
function parseAwait(value) {
  if (value === null) return null;
  const colon = value.indexOf(':');
  const what = colon < 0 ? value : value.slice(0, colon);
  const seconds = colon < 0 ? 3600 : parseSeconds('await', value.slice(colon + 1), 86_400);
  if (what !== 'payment' || seconds === 0) {
    throw new NonRetriableError(`await=${value}: expected payment or payment:SECONDS`, { status: 400 });
  }
  return seconds;
}

/**
 * @param {string | null} value ?approval=SECONDS: how long the approval link stays valid
 * @returns {number | null} seconds, or null: no approval needed
 */
function parseApproval(value) {
  if (value === null) return null;
  const seconds = parseSeconds('approval', value, 86_400);
  if (seconds === 0) throw new NonRetriableError(`approval=${value}: expected seconds above 0`, { status: 400 });
  return seconds;
}

/** @param {string | null} value ?insure=1 or ?insure=decline */
function parseInsure(value) {
  if (value !== null && value !== '1' && value !== 'decline') {
    throw new NonRetriableError(`insure=${value}: expected 1 or decline`, { status: 400 });
  }
  return value;
}

/** @param {string} value ?drift=0 or ?drift=1 */
function parseDrift(value) {
  return parseFlag('drift', value);
}

/**
 * @param {string[]} values ?stall=STEP:SECONDS, repeatable
 * @returns {Map<string, number>} which steps stall on their first run, for how many seconds
 */
function parseStalls(values) {
  const stalls = new Map();
  for (const value of values) {
    const colon = value.indexOf(':');
    const name = colon < 0 ? value : value.slice(0, colon);
    if (!STEPS.includes(name) || colon < 0) {
      throw new NonRetriableError(`stall=${value}: expected STEP:SECONDS, STEP one of ${STEPS.join(', ')}`,
        { status: 400 });
    }
    stalls.set(name, parseSeconds('stall', value.slice(colon + 1), 60));
  }
  return stalls;
}

/** @param {string} prefix */
function reference(prefix) {
  return `${prefix}-${randomBytes(4).toString('hex').toUpperCase()}`;
}

/**
 * @param {import('node:http').ServerResponse} res
 * @param {number} status
 * @param {unknown} body
 */
function sendJson(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

async function main() {
  const { values } = parseArgs({
    options: { host: { type: 'string', default: '127.0.0.1' }, port: { type: 'string' } },
  });
  const port = Number(values.port ?? process.env.PORT ?? 3000);
  const host = /** @type {string} */ (values.host);
  const { server } = createTripService();
  await new Promise((resolve) => server.listen(port, host, () => resolve(undefined)));
  const address = /** @type {import('node:net').AddressInfo} */ (server.address());
  const shown = host.includes(':') ? `[${host}]` : host;
  console.log(`trip service listening on http://${shown}:${address.port}`);
  const stop = () => {
    server.close(() => process.exit(0));
    // Idle keep-alive connections (the gateway's pool) would hold close() open.
    server.closeIdleConnections();
  };
  process.once('SIGTERM', stop);
  process.once('SIGINT', stop);
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  await main();
}
