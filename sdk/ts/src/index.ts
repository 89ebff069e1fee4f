// @tether/client: a Tether device client over WebSocket, following schemas/PROTOCOL.md.

export {
  TetherClient,
  Message,
  localStorageStore,
  SDK_VERSION,
  type ClientOptions,
  type ClientEvents,
  type ClientState,
  type Receipt,
  type ResumeState,
  type ResumeStore,
  type BackoffOptions,
  type WebSocketLike,
} from "./client.js";
export { TetherError, codeName, codeNumber, isRetryable, type ErrorCodeName } from "./errors.js";
export { Discovery, type DiscoveryOptions, type Endpoints, type EndpointInfo, type Provider } from "./discovery.js";
export {
  FrameType,
  decodeFrame,
  encodeLogin,
  encodePing,
  encodeUp,
  encodeDownAck,
  type Frame,
  type Login,
  type LoginAck,
  type Up,
  type UpAck,
  type Down,
  type Redirect,
  type ErrorHeader,
  type RoomCursor,
} from "./frame.js";
