// A minimal protobuf (proto3 binary) codec: varints and length-delimited fields, which is
// all the variable headers of PROTOCOL.md section 4 use.
//
// Integers are JavaScript numbers: every uint64 of the protocol is exact up to 2^53 - 1
// (sequences, ids and timestamps stay far below it). Larger values decode without error
// but lose their low bits.

const utf8Encoder = new TextEncoder();
const utf8Decoder = new TextDecoder("utf-8", { fatal: true });

/** Encodes a string as UTF-8. */
export function utf8(text: string): Uint8Array {
  return utf8Encoder.encode(text);
}

/** Appends protobuf fields to a growing byte array, in the order they are written. */
export class Writer {
  private _b: number[] = [];

  /** Writes a raw varint (no tag). */
  _varint(value: number): this {
    if (!(value >= 0 && value < 2 ** 64)) throw new RangeError(`uint64: ${value}`);
    let v = Math.floor(value);
    for (; v >= 128; v = Math.floor(v / 128)) this._b.push((v % 128) | 128);
    this._b.push(v);
    return this;
  }

  /** A varint field; skipped when 0 (proto3 default). */
  _uint(field: number, value: number | undefined): this {
    return value ? this._varint(field * 8)._varint(value) : this;
  }

  /** A length-delimited field, always written (used for sub-messages and map entries). */
  _bytesField(field: number, value: Uint8Array): this {
    this._varint(field * 8 + 2)._varint(value.length);
    value.forEach((b) => this._b.push(b));
    return this;
  }

  /** A string field; skipped when empty (proto3 default). */
  _string(field: number, value: string | undefined): this {
    return value ? this._bytesField(field, utf8(value)) : this;
  }

  /** The bytes written so far. */
  _finish(): Uint8Array {
    return Uint8Array.from(this._b);
  }
}

/**
 * Reads the fields of one message: calls `field(number, wireType, read)` for each, where
 * `read()` returns the value (a number for a varint, bytes for a length-delimited field).
 * Fields the callback does not read are skipped. Throws on truncation, a field number 0
 * or wire types 3/4 (groups) and 6/7.
 */
export function readFields(
  buf: Uint8Array,
  field: (n: number, wire: number, read: () => number | Uint8Array) => void,
): void {
  let pos = 0;
  const varint = () => {
    let result = 0;
    for (let scale = 1; ; scale *= 128) {
      if (pos >= buf.length || scale > 2 ** 63) throw new Error("bad varint");
      const b = buf[pos++];
      result += (b & 127) * scale;
      if (b < 128) return result;
    }
  };
  const take = (n: number) => {
    if (pos + n > buf.length) throw new Error("truncated");
    pos += n;
    return buf.subarray(pos - n, pos);
  };
  while (pos < buf.length) {
    const tag = varint();
    const n = Math.floor(tag / 8);
    const wire = tag % 8;
    if (n === 0) throw new Error("field 0");
    const read = () =>
      wire === 0 ? varint() : wire === 2 ? take(varint()) : wire === 1 ? take(8) : wire === 5 ? take(4) : raise(wire);
    let done = false;
    field(n, wire, () => {
      done = true;
      return read();
    });
    if (!done) read();
  }
}

function raise(wire: number): never {
  throw new Error(`wire type ${wire}`);
}

/** Decodes UTF-8; throws on invalid bytes (PROTOCOL.md section 4: a malformed frame). */
export function fromUtf8(bytes: Uint8Array): string {
  return utf8Decoder.decode(bytes);
}
