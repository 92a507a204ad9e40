/**
 * Durations and instants as the SDK accepts them and as the callback API wants them.
 *
 * A duration is a number of milliseconds (like setTimeout) or a string in the gateway's own
 * grammar: a non-negative number followed by `ms`, `s`, `m`, `h` or `d` ("500ms", "30s", "1.5h").
 */

import { StepUsageError } from './errors.js';

const UNIT_MS = { ms: 1, s: 1_000, m: 60_000, h: 3_600_000, d: 86_400_000 };
const DURATION = /^(\d+(?:\.\d+)?)(ms|s|m|h|d)$/;

/**
 * @param {unknown} value a number of milliseconds or a duration string
 * @param {string} what names the argument in the error message
 * @returns {number} whole milliseconds (rounded up, so a wait is never shorter than asked)
 */
export function toMilliseconds(value, what) {
  let ms;
  if (typeof value === 'number') {
    ms = value;
  } else if (typeof value === 'string') {
    const found = DURATION.exec(value.trim());
    if (found === null) {
      throw new StepUsageError(
        `${what}: "${value}" is not a duration; use milliseconds or e.g. "500ms", "30s", "5m", "1h", "2d"`);
    }
    ms = Number(found[1]) * UNIT_MS[/** @type {keyof typeof UNIT_MS} */ (found[2])];
  } else {
    throw new StepUsageError(`${what} must be milliseconds or a duration string, got ${typeof value}`);
  }
  if (!Number.isFinite(ms) || ms < 0) {
    throw new StepUsageError(`${what} must be a finite, non-negative duration, got ${String(value)}`);
  }
  return Math.ceil(ms);
}

/**
 * The wire form of a duration: whole seconds ("90s") or else whole milliseconds ("1500ms"), the
 * same form the Python SDK sends, with no fractions for the gateway to parse.
 * @param {number} ms whole milliseconds
 * @returns {string}
 */
export function formatDuration(ms) {
  return ms % 1_000 === 0 ? `${ms / 1_000}s` : `${ms}ms`;
}

/**
 * @param {unknown} value a Date, an ISO 8601 / RFC 3339 string, or epoch milliseconds
 * @param {string} what names the argument in the error message
 * @returns {number} epoch milliseconds
 */
export function toEpochMilliseconds(value, what) {
  let ms = Number.NaN;
  if (value instanceof Date) ms = value.getTime();
  else if (typeof value === 'string') ms = Date.parse(value);
  else if (typeof value === 'number') ms = value;
  if (!Number.isFinite(ms)) {
    throw new StepUsageError(`${what} must be a valid Date, date string or epoch milliseconds`);
  }
  return ms;
}

/**
 * RFC 3339 with an explicit numeric offset ("+00:00" rather than "Z"): every parser reads it.
 * @param {number} epochMs
 */
export function formatInstant(epochMs) {
  return new Date(epochMs).toISOString().replace(/Z$/, '+00:00');
}

// setTimeout keeps delays in a signed 32-bit int and fires at once beyond it (~24.8 days).
const MAX_TIMER_MS = 2 ** 31 - 1;

/**
 * Sleeps in-process until `epochMs`, in chunks so long sleeps do not overflow the timer.
 * @param {number} epochMs
 */
export async function sleepUntilLocal(epochMs) {
  for (;;) {
    const left = epochMs - Date.now();
    if (left <= 0) return;
    await new Promise((resolve) => setTimeout(resolve, Math.min(left, MAX_TIMER_MS)));
  }
}
