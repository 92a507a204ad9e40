// Type declarations for @stepgate/client (hand-written; the package itself is plain JavaScript).

import type { IncomingMessage, ServerResponse } from 'node:http';

/** A value that survives JSON: what a step returns, first time and on replay alike. */
export type JsonValue = null | boolean | number | string | JsonValue[] | { [key: string]: JsonValue };

/** Milliseconds, or a string such as "500ms", "30s", "5m", "1.5h", "2d". */
export type Duration = number | `${number}${'ms' | 's' | 'm' | 'h' | 'd'}`;

/** The event object a wait resolves with. */
export interface StepgateEvent<Data = unknown> {
  name: string;
  data: Data;
  id: string;
  /** When the gateway received the event, as the gateway sends it. */
  ts: string | number;
}

export interface WaitForEventOptions {
  /** The event name to wait for, e.g. "order.paid". */
  event: string;
  /** Dotted paths into the event object ("data.order_id") mapped to values that must be JSON-equal. */
  match?: Record<string, unknown>;
  /** How long to wait (more than 0) before resolving with null; the gateway's default is 24h. */
  timeout?: Duration;
}

/** How long a step's retries wait: after the n-th failed attempt about min(max, initial × multiplier^(n−1)), with jitter. */
export interface BackoffOptions {
  /** The first wait (default "1s"). */
  initial?: Duration;
  /** The longest wait (default "1m", or `initial` if that is longer; at most "1d"). */
  max?: Duration;
  /** From 1 to 100 (default 2). */
  multiplier?: number;
}

/** A step's own policy (protocol v1.1), given before the function: `step.run(name, options, fn, ...args)`. */
export interface StepOptions {
  /**
   * Retry a failed attempt of this step up to `retries` times (0 to 999) on its own back-off,
   * instead of by the route's retry policy. Once they are spent the gateway records the step
   * failed for good, and `run` rejects with StepFailedError, now and on every replay, without
   * calling the function again.
   */
  retries?: number;
  /** The back-off between the retries (needs `retries`); a duration sets the first wait. */
  backoff?: Duration | BackoffOptions;
  /**
   * How long one attempt may take: past it the step rejects with StepTimeoutError, a failed
   * attempt like any other (the function itself goes on; its result is dropped).
   */
  timeout?: Duration;
}

export interface InvokeOptions {
  /** The name of a durable route of the gateway (its `routes[].name`). */
  route: string;
  /** The child's request body, sent as JSON (default null). */
  body?: unknown;
}

export interface SignalOptions {
  /** How long the URL may be POSTed to (more than 0) before `wait()` resolves with null; the gateway's default is 24h. */
  timeout?: Duration;
}

/** What `step.signal` resolves with. */
export interface SignalHandle<Data = unknown> {
  /**
   * Where to POST the signal's JSON body: `{public_url}/_stepgate/signals/{id}?token=…`, relative
   * to the gateway's public listener unless the gateway sets `public_url`. Single use, and a
   * secret: whoever has it can complete the signal.
   */
  readonly url: string;
  readonly stepId: string;
  /** Whether the signal was POSTed to (or timed out) before this invocation. */
  readonly completed: boolean;
  /**
   * The JSON body POSTed to `url`, or null once the time-out has passed. Until then the
   * invocation suspends (the run is parked) and the promise rejects with the suspend signal.
   */
  wait(): Promise<Data | null>;
}

export interface Step {
  /**
   * Runs `fn(...args)` as the step `name`. Under the gateway a recorded result is returned without
   * running `fn` again. The result goes through JSON (undefined becomes null, a Date a string),
   * the same on a first run and on replay. A throwing step records its error and rethrows it.
   */
  run<Args extends unknown[], Result>(
    name: string,
    fn: (...args: Args) => Result | PromiseLike<Result>,
    ...args: Args
  ): Promise<Awaited<Result>>;

  /** The same, with the step's own retry policy and time-out (see StepOptions). */
  run<Args extends unknown[], Result>(
    name: string,
    options: StepOptions,
    fn: (...args: Args) => Result | PromiseLike<Result>,
    ...args: Args
  ): Promise<Awaited<Result>>;

  /** Pauses for `duration`; under the gateway the run is parked and this invocation suspends. */
  sleep(name: string, duration: Duration): Promise<void>;

  /** Pauses until `when` (a Date, a date string, or epoch milliseconds). */
  sleepUntil(name: string, when: Date | string | number): Promise<void>;

  /**
   * Waits for a matching event; resolves with the event, or null after `timeout`. Only under the
   * gateway: elsewhere it rejects with StepUsageError.
   */
  waitForEvent<Data = unknown>(name: string, options: WaitForEventOptions): Promise<StepgateEvent<Data> | null>;

  /**
   * Sends the event `name` with `data` (JSON) from this run, once, recorded as the step `name`;
   * resolves with the event's id. A replay resolves with the recorded id and sends nothing, and
   * the id is the same on every attempt, so a send cut short by a crash is delivered once. Only
   * under the gateway: elsewhere it rejects with StepUsageError.
   */
  sendEvent(name: string, data?: unknown): Promise<string>;

   * A single-use URL that completes this step when JSON is POSTed to it (an approval link, a
   * webhook). Resolves at once with the handle; `await handle.wait()` parks the run until the
   * URL is POSTed to or `timeout` passes. Only under the gateway: elsewhere it rejects with
   * StepUsageError.
   */
  signal<Data = unknown>(name: string, options?: SignalOptions): Promise<SignalHandle<Data>>;

  /**
   * Runs the durable route `options.route` as a child of this run (a POST of `options.body`, as
   * JSON, to its path; started once however often this run is replayed) and resolves with the
   * child's final response body, JSON-decoded when it is JSON, else its text. The run is parked
   * meanwhile. A child that ends failed rejects with StepFailedError whose `status` is the child's
   * final HTTP status, on this invocation and every replay. Cancelling this run cancels the child.
   * Only under the gateway: elsewhere it rejects with StepUsageError.
   */
  invoke<Result = unknown>(name: string, options: InvokeOptions): Promise<Result>;
}

export const step: Step;

/** Root of every error the SDK raises. */
export class StepgateError extends Error {
  constructor(message: string, options?: { cause?: unknown });
}

/** Answer `status` (400..599, default 500) as problem+json and tell the gateway not to retry. */
export class NonRetriableError extends StepgateError {
  constructor(message: string, options?: { status?: number; cause?: unknown });
  readonly status: number;
}

/** The handler called its steps in another order than the run recorded. */
export class ReplayMismatchError extends StepgateError {
  constructor(fields: {
    runId: string | null; seq: number; stepId: string; recordedId: string | null;
    recordedSeq: number | null; kind?: string; recordedKind?: string;
  });
  readonly runId: string | null;
  readonly seq: number;
  readonly stepId: string;
  /** The id recorded at position `seq`, or null if none is. */
  readonly recordedId: string | null;
  /** The position where `stepId` is recorded, or null if it is not. */
  readonly recordedSeq: number | null;
}

/** A step returned a value that JSON cannot hold (a BigInt, a cycle, a function). */
export class StepOutputError extends StepgateError {
  constructor(message: string, fields: { stepId: string; cause?: unknown });
  readonly stepId: string;
}

/** A step API was misused (bad name or duration, nested step, waitForEvent without the gateway). */
export class StepUsageError extends StepgateError {
  constructor(message: string, options?: { stepId?: string | null; cause?: unknown });
  readonly stepId: string | null;
}

/**
 * The step has failed for good and is not run again, on this or any replay: its retry policy's
 * attempts are spent (the gateway recorded it `failed` with `final: true`), or the child run it
 * started ended failed (`status` is the child's final HTTP status). Catch it to compensate and
 * answer; left uncaught, the run fails.
 */
export class StepFailedError extends StepgateError {
  constructor(message: string, fields: {
    stepId: string; runId?: string | null; error?: { message: string; type?: string } | null;
    attempts?: number | null; status?: number | null; cause?: unknown;
  });
  readonly stepId: string;
  readonly runId: string | null;
  /** The last recorded error of the step, when there is one. */
  readonly error: { message: string; type?: string } | null;
  /** How many attempts the step used, when known. */
  readonly attempts: number | null;
  /** A failed child run's final HTTP status, else null. */
  readonly status: number | null;
}

/** The step ran longer than its `timeout` (milliseconds) and was cut off: one failed attempt. */
export class StepTimeoutError extends StepgateError {
  constructor(message: string, fields: { stepId: string; timeout: number });
  readonly stepId: string;
  /** The time-out, in milliseconds. */
  readonly timeout: number;
}

/** The gateway refused a callback (an error status) or gave an unusable answer. */
export class CallbackError extends StepgateError {
  constructor(message: string, fields: {
    runId: string | null; stepId: string | null; method: string; status: number | null;
    problem: unknown; cause?: unknown;
  });
  readonly runId: string | null;
  readonly stepId: string | null;
  readonly method: string;
  /** The HTTP status of the gateway's answer, or null when none arrived. */
  readonly status: number | null;
  /** The parsed problem+json body, when the gateway sent one. */
  readonly problem: unknown;
}

/** No answer from the gateway at all: connection refused or reset, or a timeout. */
export class GatewayUnavailableError extends CallbackError {}

/**
 * True for the suspend signal thrown by sleep/waitForEvent when the run parks. It is not an
 * Error; a handler that catches broadly must rethrow it.
 */
export function isSuspend(error: unknown): boolean;

/** `catch (err) { rethrowIfSuspend(err); ... }` */
export function rethrowIfSuspend(error: unknown): void;

/**
 * Thrown by step calls once the gateway has given up on this attempt (it timed out, a newer
 * attempt started, the run was cancelled or ended): nothing more from it is recorded, so the
 * handler must stop. Like the suspend signal it does NOT extend Error, and it is sticky: every
 * later step call throws it again, and the adapter answers 409 whatever the handler does.
 */
export class SupersededError {
  constructor(fields: {
    runId: string | null; attempt: number | null; currentAttempt?: number | null;
    runStatus?: string | null; stepId?: string | null; problem?: unknown;
  });
  readonly name: 'SupersededError';
  readonly message: string;
  readonly runId: string | null;
  /** This invocation's attempt number. */
  readonly attempt: number | null;
  /** The attempt the run is at now, when the gateway said. */
  readonly currentAttempt: number | null;
  /** The run's status, when the gateway said. */
  readonly runStatus: string | null;
  /** The step whose callback was refused. */
  readonly stepId: string | null;
  /** The gateway's problem+json body. */
  readonly problem: unknown;
}

/** True for the superseded signal (from any copy of this package). */
export function isSuperseded(error: unknown): error is SupersededError;

/** True for either control signal, suspend or superseded. */
export function isStepgateControl(error: unknown): boolean;

/** `catch (err) { rethrowIfStepgateControl(err); ... }`: lets both control signals through. */
export function rethrowIfStepgateControl(error: unknown): void;

export interface WrapOptions {
  /**
   * Receives unexpected handler errors and replay mismatches (never the control signals, nor
   * anything after the gateway fenced the attempt); default: console.error.
   */
  onError?: (error: unknown) => void;
}

/** Wraps a node:http / Express handler; the result never rejects. */
export function wrapNodeHandler<Rest extends unknown[] = []>(
  handler: (req: IncomingMessage, res: ServerResponse, ...rest: Rest) => unknown,
  options?: WrapOptions,
): (req: IncomingMessage, res: ServerResponse, ...rest: Rest) => Promise<void>;

/** Wraps a fetch-style handler; the result never rejects. */
export function wrapFetchHandler<Rest extends unknown[] = []>(
  handler: (request: Request, ...rest: Rest) => Response | Promise<Response>,
  options?: WrapOptions,
): (request: Request, ...rest: Rest) => Promise<Response>;
