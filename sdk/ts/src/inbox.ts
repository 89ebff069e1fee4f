// QoS1 downlink ordering (PROTOCOL.md section 6.4): keeps H, the highest contiguous seq
// delivered; drops duplicates; holds early arrivals until the gap before them fills; says
// what the cumulative DOWN_ACK should carry.

/** Orders QoS1 messages by their per-device seq. */
export class Inbox<T> {
  /** H: every seq up to this one was delivered. */
  private _h: number;
  private readonly _early = new Map<number, T>();
  private _ackDue = false;

  constructor(
    resumeSeq = 0,
    /** Most early messages held; further ones are dropped (the server resends them). */
    private readonly _maxEarly = 1024,
  ) {
    this._h = resumeSeq;
  }

  /** H, the highest contiguous seq delivered (LOGIN resume_seq, DOWN_ACK seq). */
  get _delivered(): number {
    return this._h;
  }

  /** How many messages wait for a gap to fill. */
  get _held(): number {
    return this._early.size;
  }

  /**
   * The server counts everything up to `seq` as acknowledged (LOGIN_ACK last_acked_seq):
   * none of it comes again, so H moves there. Returns held messages that became
   * contiguous, to deliver now.
   */
  _ackedByServer(seq: number): T[] {
    if (seq <= this._h) return [];
    this._h = seq;
    for (const k of [...this._early.keys()]) if (k <= seq) this._early.delete(k);
    return this._drain([]);
  }

  /**
   * Offers QoS1 message `seq`; returns the messages to deliver now, in order (empty for
   * a duplicate, a held or a dropped message). Every offer makes an ack due.
   */
  _offer(seq: number, message: T): T[] {
    this._ackDue = true;
    if (seq <= this._h) return [];
    if (seq > this._h + 1) {
      if (!this._early.has(seq) && this._early.size < this._maxEarly) this._early.set(seq, message);
      return [];
    }
    this._h = seq;
    this._early.delete(seq);
    return this._drain([message]);
  }

  /** The seq to acknowledge if an ack is due (clears the due flag), else undefined. */
  _takeAck(): number | undefined {
    const due = this._ackDue;
    this._ackDue = false;
    return due && this._h > 0 ? this._h : undefined;
  }

  private _drain(ready: T[]): T[] {
    for (;;) {
      const next = this._early.get(this._h + 1);
      if (next === undefined) return ready;
      this._early.delete(this._h + 1);
      this._h += 1;
      ready.push(next);
    }
  }
}
