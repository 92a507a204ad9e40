/**
 * @stepgate/client: durable steps for HTTP handlers behind the Stepgate gateway.
 * The public API is declared here and in index.d.ts; every other module is private.
 */

export { step } from './step.js';
export {
  CallbackError,
  NonRetriableError,
  ReplayMismatchError,
  GatewayUnavailableError,
  StepgateError,
  StepFailedError,
  StepOutputError,
  StepTimeoutError,
  StepUsageError,
  SupersededError,
  isStepgateControl,
  isSuperseded,
  isSuspend,
  rethrowIfStepgateControl,
  rethrowIfSuspend,
} from './errors.js';
export { wrapNodeHandler } from './node.js';
export { wrapFetchHandler } from './fetch.js';
